"""Plot runs from their `metrics.jsonl`: loss and tokens/s against step, one line per run (`mimo plot`).

Eval lines (`"kind": "eval"`) show as points: eval loss on the loss panel, exact match and token accuracy (or an
older run's accuracy) on its right-hand axis.
Matplotlib draws with its non-interactive Agg canvas (no pyplot), so it works on a machine with no display
and leaves the backend of a notebook or script that calls it alone.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # as mimo.training.metrics writes it (not imported: plotting needs no torch)


class PlotError(ValueError):
    """A run directory whose metrics cannot be plotted."""


class BadRecordsWarning(UserWarning):
    """Lines of a metrics file that are not records and were skipped."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of `run_dir/metrics.jsonl`; a cut-off last line (a run still writing) is skipped, and so is
    any other line that is not a record (not JSON, not an object, no integer `step`), named in one warning."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path}: no such file; is {run_dir} a mimo run directory?")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem = _record_problem(line)
        if problem and number == len(lines):  # no newline after it: the writer was interrupted mid-line
            continue
        if problem:
            bad.append(f"line {number} ({problem})")
        else:
            records.append(json.loads(line))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"{path}: skipped {len(bad)} bad record(s): {', '.join(bad[:5])}{more}",
                      BadRecordsWarning, stacklevel=2)
    return records


def _record_problem(line: str) -> str:
    """Why a line is not a metrics record ('' if it is one)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not JSON: {e.msg}"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return "no integer step"
    return ""


def split_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training steps, evaluations) of a run; an error if it has no training step with a loss."""
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise PlotError(f"{Path(run_dir) / METRICS_FILE}: no training steps logged yet, nothing to plot")
    return train, evals


# held-out scores drawn on the loss panel's right-hand axis: (metrics key, marker, legend name); "accuracy" is the
# digits' score in runs from before held-out answers were scored by exact match and token accuracy
SCORES = (("exact_match", "^", "exact match"), ("token_accuracy", "v", "token accuracy"), ("accuracy", "^", "accuracy"))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold `key`."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write a PNG of loss and tokens/s against step for each run (labelled by its directory's name); returns the
    file written (`_image_path`: an existing directory or a name without an image suffix gets one)."""
    if not run_dirs:
        raise PlotError("no run directories given")
    runs = {Path(d): split_records(Path(d)) for d in run_dirs}  # read everything before drawing anything
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)  # Agg, attached to this figure only: no pyplot, no global backend switch
    ax_loss, ax_speed = fig.subplots(1, 2)
    ax_acc = None
    for i, (run_dir, (train, evals)) in enumerate(runs.items()):
        color, label = f"C{i}", run_dir.resolve().name
        ax_loss.plot(*_series(train, "loss"), color=color, label=label)
        ax_speed.plot(*_series(train, "tokens_per_s"), color=color, label=label)
        eval_steps, eval_loss = _series(evals, "loss")
        if eval_steps:
            ax_loss.plot(eval_steps, eval_loss, "o", color=color, label=f"{label} (eval)")
        for key, marker, name in SCORES:
            score_steps, score = _series(evals, key)
            if score_steps:
                ax_acc = ax_acc or ax_loss.twinx()
                ax_acc.plot(score_steps, score, marker, color=color, label=f"{label} {name} (eval)")
    _finish(ax_loss, ax_speed, ax_acc)
    out = _image_path(Path(out), fig.canvas.get_supported_filetypes())
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write {out}: {e.strerror or e} (is a part of its path a file?)") from None
    return out


def _image_path(out: Path, formats: dict[str, str]) -> Path:
    """The file `--out` means: `out/plot.png` for a directory, `out` + `.png` for a name without an image suffix
    (what matplotlib would write anyway, now also what is reported), else `out`."""
    if out.is_dir():
        return out / "plot.png"
    return out if out.suffix[1:].lower() in formats else out.with_name(f"{out.name}.png")


def _finish(ax_loss: Any, ax_speed: Any, ax_acc: Any | None) -> None:
    """Titles, axis labels, grids and legends."""
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(title="loss", xlabel="step", ylabel="loss")
    ax_speed.set(title="throughput", xlabel="step", ylabel="tokens/s")
    for ax in (ax_loss, ax_speed):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    handles, labels = ax_loss.get_legend_handles_labels()
    if ax_acc is not None:
        ax_acc.set_ylabel("eval accuracy")
        more = ax_acc.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax_loss.legend(handles, labels, fontsize="small")
    ax_speed.legend(fontsize="small")


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    """`RUN_DIR/plot.png` for one run; `comparison.png` in the working directory for several."""
    return Path(run_dirs[0]) / "plot.png" if len(run_dirs) == 1 else Path("comparison.png")
