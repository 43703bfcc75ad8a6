"""MetricsWriter lines parse and hold their keys; Progress prints plain lines off a terminal, a bar on one."""

from __future__ import annotations

import importlib.util
import io
import json
import math

import pytest

from mimo.data import SkippedSample
from mimo.training.metrics import (
    STEP_KEYS,
    MetricsWriter,
    Progress,
    SkippedSamples,
    cut_metrics,
    format_duration,
    format_rate,
)
from mimo.training.step import StepResult

SECONDS = {"images.forward": 0.1, "language.forward_backward": 0.6, "images.backward": 0.2, "optimizer": 0.05,
           "step": 1.0}


def result(loss: float = 2.5, seconds: dict | None = None) -> StepResult:
    """A step that took 1 s for 4096 positions, 3000 of them real tokens, 1500 labelled."""
    seconds = dict(SECONDS if seconds is None else seconds)
    return StepResult(loss=loss, label_tokens=1500, tokens=3000, positions=4096, grad_norm=0.75, lr=1e-4,
                      seconds=seconds)


def lines(run_dir) -> list[dict]:
    """Parsed lines of the run's metrics file."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_step_and_eval_lines(tmp_path) -> None:
    """Each call is one flushed line, readable before the writer closes; the keys the plot and people need."""
    run = tmp_path / "run"
    writer = MetricsWriter(run)
    writer.log_step(1, result(), flops=3e12, extra={"epoch": 0})
    assert len(lines(run)) == 1  # flushed, not waiting for close
    writer.log_step(2, result(loss=2.0))
    writer.log_eval(2, {"loss": 1.9, "accuracy": 0.25})
    writer.close()
    first, second, ev = lines(run)
    assert set(STEP_KEYS) <= set(first)
    assert first["kind"] == "train" and first["step"] == 1 and first["loss"] == 2.5 and first["epoch"] == 0
    assert first["tokens_per_s"] == pytest.approx(3000) and first["step_time_s"] == 1.0  # real tokens, and
    assert first["positions_per_s"] == pytest.approx(4096) and first["positions"] == 4096  # what was computed
    assert first["tokens"] == 3000 and first["label_tokens"] == 1500
    assert first["tflops"] == pytest.approx(3.0) and second["tflops"] is None
    assert first["images.forward_s"] == 0.1 and first["language.forward_backward_s"] == 0.6
    assert first["images.backward_s"] == 0.2 and first["optimizer_s"] == 0.05 and "step_s" not in first
    assert first["grad_norm"] == 0.75 and first["lr"] == 1e-4 and first["peak_memory_gb"] > 0
    assert ev == {"kind": "eval", "step": 2, "time": ev["time"], "loss": 1.9, "accuracy": 0.25}


def test_appends_on_resume_and_writes_strict_json(tmp_path) -> None:
    """A second writer continues the file; a NaN loss (diverged run) is written as null, not NaN."""
    with MetricsWriter(tmp_path) as w:
        w.log_step(1, result())
    with MetricsWriter(tmp_path) as w:
        w.log_step(2, result(loss=math.nan, seconds={}))
    a, b = lines(tmp_path)
    assert (a["step"], b["step"]) == (1, 2) and b["loss"] is None and b["tokens_per_s"] is None
    assert b["positions_per_s"] is None


def test_disabled_writer_touches_nothing(tmp_path) -> None:
    """Other ranks can hold a disabled writer and call it like rank 0."""
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.log_step(1, result())
    w.log_eval(1, {"accuracy": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_extra_may_not_overwrite_a_metric(tmp_path) -> None:
    """An extra named like a core metric would silently change its meaning."""
    with MetricsWriter(tmp_path) as w, pytest.raises(ValueError, match=r"\['loss'\] are reserved"):
        w.log_step(1, result(), extra={"loss": 0.0})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(tmp_path) -> None:
    """Asking for TensorBoard without the package names the package and the way out."""
    with pytest.raises(ImportError, match="'tensorboard' package is not installed"):
        MetricsWriter(tmp_path, tensorboard=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_events(tmp_path) -> None:
    """With the package, event files appear under run_dir/tb."""
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.log_step(1, result(), flops=1e12)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_progress_plain_lines_off_a_terminal() -> None:
    """StringIO is not a terminal: a plain line every `every` steps and at the last; no carriage returns."""
    out = io.StringIO()
    with Progress(10, stream=out, every=4) as p:
        for step in range(1, 11):
            p.update(step, loss=3.0 / step, tokens_per_s=12345.0)
        p.log("eval accuracy 0.5")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    got = text.splitlines()
    assert [line.split()[1] for line in got[:3]] == ["4/10", "8/10", "10/10"] and got[3] == "eval accuracy 0.5"
    assert got[0].startswith("step 4/10 | loss 0.7500 | 12.3k tokens/s | ETA ")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal() -> None:
    """One line rewritten in place (\\r ... clear-to-end), ended with a newline at the last step."""
    out = FakeTerminal()
    p = Progress(4, stream=out)
    p.REDRAW_S = 0.0
    for step in range(1, 5):
        p.update(step, loss=1.0, tokens_per_s=500.0)
    text = out.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 1 and text.endswith("\n")
    assert "[##########----------] step 2/4" in text and "[####################] step 4/4" in text


def test_progress_quiet_and_disabled() -> None:
    """`quiet` prints plain lines even on a terminal; `enabled=False` prints nothing."""
    out = FakeTerminal()
    Progress(2, stream=out, quiet=True, every=1).update(1, 1.0, 1.0)
    assert out.getvalue().startswith("step 1/2 |")
    silent = io.StringIO()
    Progress(2, enabled=False, stream=silent).update(2, 1.0, 1.0)
    assert silent.getvalue() == ""


def test_formatting() -> None:
    """Durations as M:SS / H:MM:SS, rates with k/M, unknowns as '?'."""
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05" and format_duration(math.nan) == "?"
    assert format_rate(950) == "950" and format_rate(12345) == "12.3k" and format_rate(4.56e6) == "4.56M"


def test_cut_metrics_makes_a_resumed_run_one_series(tmp_path) -> None:
    """Issue 17: killed mid-line after logging past its last checkpoint (step 2), then resumed at step 2: the
    cut line and the records of steps 3-4 go, so the resumed run's lines follow on as one valid series."""
    run = tmp_path / "run"
    with MetricsWriter(run) as w:
        for step in range(1, 5):
            w.log_step(step, result())
        w.log_eval(2, {"accuracy": 0.5})
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # the kill
    assert cut_metrics(run, 2) == ["2 record(s) past step 2", "a cut-off last line"]
    with MetricsWriter(run) as w:
        w.log_step(3, result())
    assert [(r["kind"], r["step"]) for r in lines(run)] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    assert cut_metrics(run, 3) == [] and cut_metrics(tmp_path / "none", 0) == []
    assert cut_metrics(run, 0) == ["4 record(s) past step 0"] and lines(run) == []  # resumed with no checkpoint


def test_skipped_samples_are_counted_named_and_carried_over_a_resume() -> None:
    tally = SkippedSamples()
    assert tally.summary() is None  # nothing skipped: no line
    tally.add([SkippedSample(4, "images/4.jpg", "missing image")])
    assert tally.summary() == "skipped 1 bad sample(s); they were: sample 4 (images/4.jpg): missing image"
    tally.add(SkippedSample(i, f"images/{i}.jpg", "corrupt") for i in range(10, 16))
    resumed = SkippedSamples()
    resumed.load_state_dict(json.loads(json.dumps(tally.state_dict())))  # through a checkpoint's JSON
    assert (resumed.count, resumed.first) == (7, tally.first)
    assert resumed.summary() == ("skipped 7 bad sample(s); the first 5: sample 4 (images/4.jpg): missing image; "
                                 "sample 10 (images/10.jpg): corrupt; sample 11 (images/11.jpg): corrupt; "
                                 "sample 12 (images/12.jpg): corrupt; sample 13 (images/13.jpg): corrupt")
    resumed.add([SkippedSample(4, "images/4.jpg", "missing image"), SkippedSample(11, "images/11.jpg", "corrupt")])
    assert resumed.count == 9 and resumed.summary().startswith(  # drawn again by the next epoch: named once
        "skipped 7 bad sample(s) (9 skips: each time an epoch drew one); the first 5: sample 4 (images/4.jpg)")
    older = SkippedSamples()
    older.load_state_dict(None)  # a checkpoint written before the tally existed
    assert older.count == 0
