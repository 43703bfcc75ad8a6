"""The training loop's data side on real process groups and real loader workers: skipped samples counted in
metrics.jsonl, kept across a resume on another layout and named at the end; a worker's error reaching the
launcher's one-line report as the dataset raised it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from mimo.data import BadSample, GlobalBatchSampler, SkippedSample
from mimo.testing import run_distributed

HETEROGENEOUS = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1, "rank_offset": 1}}
HOMOGENEOUS = {"images": {}, "language": {}}
NUM_SAMPLES, BATCH = 12, 4  # 3 global batches per epoch: four steps cross an epoch boundary


class _Skipping:
    """The run's dataset, with every index divisible by 3 reported as a bad sample its builder replaced (as a
    dataset with `on_bad_sample: skip` reports them); with `fail_at`, that index is an error instead."""

    def __init__(self, dataset, fail_at: int | None = None) -> None:
        self.dataset, self.fail_at = dataset, fail_at

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices):
        if self.fail_at in indices:
            raise BadSample(self.fail_at, f"images/{self.fail_at}.jpg", "cannot identify image file")
        batch = self.dataset.batch(indices)
        batch.skipped = tuple(SkippedSample(i, f"images/{i}.jpg", "missing image") for i in indices if _bad(i))
        return batch


def _bad(index: int) -> bool:
    return index % 3 == 0


def _config(tmp: Path, parallelism: dict, steps: int, workers: int) -> dict:
    return {
        "model": {"preset": "tiny"}, "parallelism": parallelism,
        "train": {"steps": steps, "global_batch_size": BATCH, "num_microbatches": 2, "dtype": "float64"},
        "data": {"name": "synthetic", "num_samples": NUM_SAMPLES, "num_workers": workers},
        "checkpoint": {"interval": 2}, "log": {"dir": str(tmp / "run"), "interval": 1},
    }


def _train(rank: int, world: int, config: dict, resume: bool, fail_at: int | None = None):
    """One rank of `run_training` on the wrapped dataset; rank 0 returns what it printed, or what the launcher
    records of the error it raised."""
    import mimo.launch as launch
    import mimo.training.loop as loop
    from mimo.training.plan import RunPlan, plan_run
    from mimo.training.run_config import parse_run_config

    build = RunPlan.dataset
    RunPlan.dataset = lambda plan, *args, **kwargs: _Skipping(build(plan, *args, **kwargs), fail_at)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            loop.run_training(plan_run(parse_run_config(config), world), resume=resume, quiet=True)
    except BadSample as e:
        failures = Path(config["log"]["dir"]) / f"failures{rank}"
        failures.mkdir(parents=True)
        launch._write_failure(failures, e)  # the record `mimo train` turns into its one-line report
        return json.loads(next(failures.iterdir()).read_text())["error"]
    return out.getvalue()


def _expected(steps: int) -> tuple[list[int], list[int]]:
    """The cumulative number of skipped samples after each step, and the skipped indices, from the sampler."""
    sampler, skipped, counts = GlobalBatchSampler(NUM_SAMPLES, BATCH, seed=0), [], []
    for _ in range(steps):
        skipped += [i for i in next(sampler) if _bad(i)]
        counts.append(len(skipped))
    return counts, skipped


def test_skipped_samples_are_counted_across_a_resume_on_another_layout(tmp_path):
    expected, indices = _expected(4)
    assert expected[-1] > expected[1] > 0  # the data has skips before and after the checkpoint
    run_distributed(_train, 2, _config(tmp_path, HETEROGENEOUS, 2, workers=2), False)
    (printed,) = run_distributed(_train, 1, _config(tmp_path, HOMOGENEOUS, 4, workers=0), True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert [line["skipped_samples"] for line in lines] == expected
    assert all(line["data_wait_s"] >= 0 for line in lines)
    distinct = list(dict.fromkeys(indices))  # each bad sample counted and named once, however often drawn
    assert len(distinct) < len(indices)  # the second epoch drew some again
    named = "; ".join(f"sample {i} (images/{i}.jpg): missing image" for i in distinct[:5])
    first = "the first 5" if len(distinct) > 5 else "they were"
    assert printed.splitlines()[-1] == (f"skipped {len(distinct)} bad sample(s) ({len(indices)} skips: each time an "
                                        f"epoch drew one); {first}: {named}")


def test_a_bad_sample_in_a_loader_worker_is_the_ranks_one_line_error(tmp_path):
    third_batch = GlobalBatchSampler(NUM_SAMPLES, BATCH, seed=0).batch_at(0, 2)
    bad = next(i for i in third_batch if not _bad(i))
    reports = run_distributed(_train, 2, _config(tmp_path, HETEROGENEOUS, 4, workers=2), False, bad)
    assert reports == [f"BadSample: sample {bad} (images/{bad}.jpg): cannot identify image file"] * 2
