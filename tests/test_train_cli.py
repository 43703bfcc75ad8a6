"""`mimo train` end to end on the synthetic data: its own workers, metrics, checkpoints, resume, failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

RUN = {
    "model": {"preset": "tiny"},
    "parallelism": {"images": {"data_parallel_size": 1},
                    "language": {"data_parallel_size": 1, "rank_offset": 1}},
    # a constant learning rate, so that a run cut short (train.steps=2) follows the same schedule
    "train": {"steps": 4, "global_batch_size": 4, "num_microbatches": 2, "lr": 0.003, "dtype": "float64",
              "min_lr_ratio": 1.0},
    "data": {"name": "synthetic", "num_samples": 64},
    "checkpoint": {"interval": 2, "keep": 3},
    "log": {"interval": 1},
}


def mimo(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the `mimo` command as a user would."""
    return subprocess.run([sys.executable, "-m", "mimo", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def write_config(tmp_path: Path, **changes: dict) -> tuple[Path, Path]:
    config = {k: dict(v) for k, v in RUN.items()}
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    config["log"]["dir"] = str(run_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_and_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if m["kind"] == "train"}


def test_train_writes_metrics_checkpoints_and_resumes(tmp_path):
    path, run_dir = write_config(tmp_path)
    done = mimo("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = steps_and_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    line = metrics(run_dir)[0]
    assert {"loss", "tokens", "tokens_per_s", "step_time_s", "grad_norm", "lr", "tflops", "peak_memory_gb"} <= set(line)
    assert any(k.endswith("forward_s") for k in line) and any(k.startswith("language.") for k in line)
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step_00000002", "step_00000004"]

    # the same run in two halves: 2 steps, then --resume to 4, gives the same losses (float64)
    path2, run_dir2 = write_config(tmp_path / "halves")
    assert mimo("train", str(path2), "--quiet", "--set", "train.steps=2").returncode == 0
    resumed = mimo("train", str(path2), "--quiet", "--resume", "--set", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    halves = steps_and_losses(run_dir2)
    for step in (3, 4):
        assert abs(halves[step] - losses[step]) <= 1e-8 * abs(losses[step])

    plotted = mimo("plot", str(run_dir), str(run_dir2), "--out", str(tmp_path / "both.png"))
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_rank_ends_the_job_promptly(tmp_path):
    path, _ = write_config(tmp_path, train={"steps": 50})
    t0 = time.monotonic()
    done = mimo("train", str(path), "--quiet", env={"MIMO_INJECT_FAULT": "1:2"}, timeout=180)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1
    report = [line for line in done.stderr.splitlines() if line.startswith("mimo train:")]
    assert report[0] == "mimo train: error: rank 1 failed: RuntimeError: injected fault at step 2 (MIMO_INJECT_FAULT)"
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"  # bounded by the agent, not the 300 s PG timeout


def test_resume_from_a_corrupt_checkpoint_is_one_line(tmp_path):
    path, run_dir = write_config(tmp_path, train={"steps": 2})
    assert mimo("train", str(path), "--quiet").returncode == 0
    data = next((run_dir / "checkpoints" / "step_00000002").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])  # truncated
    done = mimo("train", str(path), "--quiet", "--resume", "--set", "train.steps=4")
    assert done.returncode == 2
    assert done.stderr.startswith("mimo train: error: checkpoint ") and "truncated or corrupt" in done.stderr
    assert done.stderr.count("\n") == 1


def test_ctrl_c_stops_every_process_and_leaves_only_complete_checkpoints(tmp_path):
    import signal

    from mimo.training.checkpoint import Checkpointer, open_checkpoint

    path, run_dir = write_config(tmp_path, train={"steps": 100_000}, checkpoint={"interval": 1, "keep": 2})
    proc = subprocess.Popen([sys.executable, "-m", "mimo", "train", str(path), "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    root = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 180  # bounds on waiting, not speed claims
        while not (root.is_dir() and Checkpointer(root).complete()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert Checkpointer(root).complete(), "no checkpoint was written within 180 s"
        time.sleep(1.0)  # let saves be in flight: a checkpoint is written every step
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-2000:]
    assert "mimo train: stopped by SIGINT" in stderr
    complete = Checkpointer(root).complete()
    assert complete and len(complete) <= 2
    for path in complete:  # each opens: neither an interrupted save nor an interrupted prune is among them
        open_checkpoint(path)
