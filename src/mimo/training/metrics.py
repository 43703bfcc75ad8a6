"""Training metrics: one JSON line per step or evaluation in `RUN_DIR/metrics.jsonl`, and a progress line.

`MetricsWriter` is meant for one rank (rank 0: the caller decides, or passes `enabled=rank == 0`); every
line is flushed as it is written, so a crashed or still-running run can be read and plotted. Lines carry
`"kind": "train"` or `"kind": "eval"`. TensorBoard event files are an option, when `tensorboard` is
installed. `Progress` draws a one-line bar on a terminal and plain lines elsewhere, with no dependency.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

if TYPE_CHECKING:  # only types here; importing the trainer would make step.py unable to import metrics
    from mimo.data.bad_samples import SkippedSample
    from mimo.training.step import StepResult

METRICS_FILE = "metrics.jsonl"
STEP_KEYS = ("kind", "step", "time", "loss", "tokens", "positions", "label_tokens", "tokens_per_s", "positions_per_s",
             "step_time_s", "tflops", "grad_norm", "lr", "peak_memory_gb")


def peak_memory_gb() -> float:
    """Peak memory of this process in GB (1e9 bytes): CUDA's max allocated when CUDA is in use, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # macOS reports bytes, Linux KiB


class Clock:
    """Timestamps that measure device time: CUDA events on a GPU (read after a synchronize), perf_counter on
    the CPU. For benchmarks and probes, which synchronize where they measure; the step itself never does."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A timestamp now (an event recorded on the current stream, on a GPU)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        """Milliseconds from mark `a` to mark `b`."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        """Wait for the device (a no-op on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize()

    def mean_ms(self, call: Callable[[], Any], warmup: int, steps: int) -> float:
        """Mean milliseconds of `call` over `steps` calls after `warmup` untimed ones (one mark each side, the
        device drained before the first and read after the last)."""
        for _ in range(warmup):
            call()
        self.sync()
        start = self.mark()
        for _ in range(steps):
            call()
        end = self.mark()
        self.sync()
        return self.ms(start, end) / steps

    def sync_stream(self) -> None:
        """Wait for the current stream only: work left on other streams (a send waiting for its receiver on a
        communication stream) is not waited for (a no-op on the CPU)."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()


def step_record(step: int, result: StepResult, flops: float | None = None) -> dict[str, Any]:
    """A training step's metrics: throughput, model TFLOP/s from the step's FLOPs, each phase's seconds.
    `tokens_per_s` is real tokens (no padding, packed or not), `positions_per_s` what the model computed;
    `{modality}_patch_balance` the encoder's max / mean patches per DP rank where images are split by patches."""
    seconds = dict(result.seconds)
    step_time = seconds.pop("step", math.nan)
    per_s = 1 / step_time if step_time > 0 else math.nan
    record = {
        "kind": "train", "step": step, "time": time.time(), "loss": result.loss, "tokens": result.tokens,
        "positions": result.positions, "label_tokens": result.label_tokens, "tokens_per_s": result.tokens * per_s,
        "positions_per_s": result.positions * per_s, "step_time_s": step_time,
        "tflops": flops * per_s / 1e12 if flops is not None else None,
        "grad_norm": result.grad_norm, "lr": result.lr, "peak_memory_gb": peak_memory_gb(),
    }
    record.update({f"{key}_s": value for key, value in seconds.items()})
    record.update({f"{name}_patch_balance": value for name, value in result.patch_balance.items()})  # max / mean
    return record


class SkippedSamples:
    """The bad samples a run has skipped so far (`MimoBatch.skipped` of each global batch): the skips, which
    `metrics.jsonl` logs as `skipped_samples` (a bad sample is skipped each time an epoch draws it), the distinct
    samples, and the first few of those named once each; kept across resume in the checkpoint."""

    NAMED = 5

    def __init__(self) -> None:
        self.count = 0
        self.samples: set[int] = set()
        self.first: list[str] = []

    def add(self, records: Iterable[SkippedSample]) -> None:
        """Count one global batch's skipped samples (every rank counts the same ones)."""
        for record in records:
            self.count += 1
            if record.index in self.samples:
                continue
            self.samples.add(record.index)
            if len(self.first) < self.NAMED:
                self.first.append(record.describe())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON)."""
        return {"count": self.count, "first": list(self.first), "samples": sorted(self.samples)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue a resumed run's tally (a checkpoint from before this tally existed: none skipped; from before
        distinct samples were kept: they are counted from the resume on)."""
        state = state or {}
        self.count, self.first = int(state.get("count", 0)), list(state.get("first", []))[:self.NAMED]
        self.samples = {int(i) for i in state.get("samples", [])}

    def summary(self) -> str | None:
        """The run's closing line about skipped samples: how many distinct ones (and how many skips, where an
        epoch drew one again) and the first few, each once; None if none."""
        if not self.count:
            return None
        distinct = len(self.samples) or self.count
        times = f" ({self.count} skips: each time an epoch drew one)" if self.count > distinct else ""
        first = f"the first {len(self.first)}" if distinct > len(self.first) else "they were"
        return f"skipped {distinct} bad sample(s){times}; {first}: " + "; ".join(self.first)


def cut_metrics(run_dir: str | Path, step: int) -> list[str]:
    """Make `run_dir/metrics.jsonl` one series again for a run resumed at `step`: drop a cut-off last line (the
    run was killed mid-write) and every record past `step` (logged after the checkpoint, to be logged again).
    Rewritten atomically; returns what was dropped, in words (nothing if there was nothing to drop)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    partial = lines.pop()  # '' if the file ends with a newline, else a line cut off mid-write
    kept, later = [], 0
    for line in lines:
        try:
            record = json.loads(line)
            past = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        except ValueError:
            past = False  # not ours to judge: `mimo plot` names it
        later += past
        if not past:
            kept.append(line)
    dropped = ([f"{later} record(s) past step {step}"] if later else []) + (["a cut-off last line"] if partial else [])
    if dropped:
        tmp = path.with_name(path.name + ".part")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def _json_value(value: Any) -> Any:
    """NaN and infinities as null (strict JSON), tensors as numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsWriter:
    """Appends JSON lines to `run_dir/metrics.jsonl` (and, optionally, TensorBoard events to `run_dir/tb`)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        """Open the file for appending (a resumed run continues it); a disabled writer touches nothing."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._file: TextIO | None = None
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            self._tb = _summary_writer(self.run_dir / "tb") if tensorboard else None

    def log_step(self, step: int, result: StepResult, flops: float | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write one training step; `flops` is the step's model FLOPs (`mimo.flops`) for `tflops`."""
        record = step_record(step, result, flops)
        return self._write(record, extra, "train")

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one evaluation (e.g. `loss`, `accuracy`) at `step`, marked `"kind": "eval"`."""
        return self._write({"kind": "eval", "step": step, "time": time.time()}, metrics, "eval")

    def _write(self, record: dict[str, Any], extra: Mapping[str, Any] | None, tag: str) -> dict[str, Any]:
        """Merge `extra` (never over a reserved key), write the line, flush, mirror to TensorBoard."""
        clash = sorted(set(extra or {}) & set(record))
        if clash:
            raise ValueError(f"metric name(s) {clash} are reserved by the {tag} record; rename them")
        record = {k: _json_value(v) for k, v in {**record, **(extra or {})}.items()}
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                    self._tb.add_scalar(f"{tag}/{key}", value, record["step"])
            self._tb.flush()
        return record

    def close(self) -> None:
        """Close the file and the TensorBoard writer."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer(log_dir: Path) -> Any:
    """TensorBoard's `SummaryWriter`, or a clear error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("TensorBoard logging was asked for, but the 'tensorboard' package is not installed: "
                          "pip install 'mimo[tensorboard]' (or tensorboard), or turn TensorBoard logging off") from e
    return SummaryWriter(log_dir=str(log_dir))


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour); '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(value: float) -> str:
    """A rate with a k/M suffix: 950, 12.3k, 4.56M."""
    if not math.isfinite(value):
        return "?"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


class Progress:
    """Step/total, loss, tokens/s and ETA: a bar redrawn in place on a terminal, plain lines elsewhere.

    Plain lines (not a terminal, or `quiet=True`) come every `every` steps (default: about 20 per run)
    and at the last step. `enabled=False` (other ranks) prints nothing.
    """

    BAR_WIDTH = 20
    REDRAW_S = 0.1  # at most ten redraws a second on a terminal

    def __init__(self, total_steps: int, enabled: bool = True, stream: TextIO | None = None, *,
                 quiet: bool = False, every: int | None = None, initial_step: int = 0) -> None:
        """Start the clock; `initial_step` is where a resumed run starts (its ETA counts from there)."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.total, self.enabled, self.stream = total_steps, enabled, stream or sys.stderr
        self.tty = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every or max(1, total_steps // 20)
        self.initial = initial_step
        self.t0 = time.monotonic()
        self._drawn = 0.0
        self._open_line = False

    def eta(self, step: int) -> float:
        """Seconds left, at the mean pace since the start."""
        done = step - self.initial
        return (time.monotonic() - self.t0) / done * (self.total - step) if done > 0 else math.nan

    def text(self, step: int, loss: float, tokens_per_s: float) -> str:
        """The status: step i/N, loss, tokens/s, ETA."""
        return (f"step {step}/{self.total} | loss {loss:.4f} | {format_rate(tokens_per_s)} tokens/s | "
                f"ETA {format_duration(self.eta(step))}")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Report step `step` (1-based, the steps done so far)."""
        if not self.enabled:
            return
        last = step >= self.total
        if self.tty:
            now = time.monotonic()
            if last or now - self._drawn >= self.REDRAW_S:
                self._drawn = now
                self._draw(f"{self._bar(step)} {self.text(step, loss, tokens_per_s)}", end="\n" if last else "")
        elif last or step % self.every == 0:
            self._print(self.text(step, loss, tokens_per_s))

    def log(self, message: str) -> None:
        """A line of its own (e.g. an evaluation) that the bar does not overwrite."""
        if not self.enabled:
            return
        if self.tty:
            self._draw(message, end="\n")
        else:
            self._print(message)

    def close(self) -> None:
        """End an open bar line."""
        if self.enabled and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def _bar(self, step: int) -> str:
        """[#####-----] filled by the fraction done."""
        filled = min(self.BAR_WIDTH, self.BAR_WIDTH * step // self.total)
        return "[" + "#" * filled + "-" * (self.BAR_WIDTH - filled) + "]"

    def _draw(self, line: str, end: str) -> None:
        """Rewrite the current terminal line (cut to the terminal's width, so it never wraps)."""
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r" + line[:width] + "\x1b[K" + end)
        self.stream.flush()
        self._open_line = not end

    def _print(self, line: str) -> None:
        """A plain line."""
        self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
