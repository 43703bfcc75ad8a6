"""benchmarks/deployments.py: its CPU dry run gives every deployment a row, and its layout tables are valid.

Speed is never asserted (DESIGN §5): the dry run only proves that every deployment of the 4-GPU table launches
as its own world (gloo, tiny preset, 2 steps), trains, reports positive throughput and the same losses, and
that the bridge timing ran on the heterogeneous rows. The tables of every GPU count are checked without
launching anything.
"""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import time

import pytest

from mimo.testing import run_distributed
from tests.scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "deployments.py"


def _load_script():
    return load_script("deployments", "deployments_bench")


bench = _load_script()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deployments")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, json.loads((out / "deployments.json").read_text())


def test_dry_run_gives_every_deployment_a_row(dry_run):
    out, stdout, report = dry_run
    expected = [row["name"] for row in bench.LAYOUTS[4]["deployments"]]
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == expected
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_gpu"] > 0 and r["step_s"] > 0, name
        assert r["world"] <= 4 and len(r["ranks"]) == r["world"]
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert 0 < r["encoder_share"] < 1 and r["busy_s"]["images"] > 0 and r["busy_s"]["language"] > 0
        assert r["wait_s"]["images"] >= 0 and r["wait_s"]["language"] >= 0
        assert (out / name / "metrics.jsonl").is_file()  # for `mimo plot`
        assert f"| {name} | {r['deployment']} | {r['world']} |" in stdout
    assert {r["deployment"] for r in rows.values()} == {"homogeneous", "colocated", "heterogeneous"}
    assert report["env"]["functional_dry_run"] is True
    assert "not a performance result" in (out / "deployments.md").read_text()


def test_dry_run_compares_deployments(dry_run):
    _, _, report = dry_run
    rows = {r["name"]: r for r in report["rows"]}
    for r in rows.values():
        bridge = r["bridge_bandwidth"]
        if r["deployment"] == "heterogeneous":
            assert bridge["bytes"] > 0 and bridge["forward_gbps"] > 0 and bridge["p2p_gbps"] > 0
        else:
            assert bridge is None
    comparison = report["comparison"]
    assert [h["row"] for h in comparison["heterogeneous"]] == ["heterogeneous-1+2"]
    assert comparison["heterogeneous"][0]["bound"] > 1
    assert comparison["best_non_homogeneous"]["ratio"] > 0
    # one model, one batch sequence: every deployment computes the same losses (float32, gloo)
    assert comparison["loss_spread"]["max_rel"] < 1e-4


@pytest.mark.parametrize("gpus", sorted(bench.LAYOUTS))
@pytest.mark.parametrize("workload", sorted(bench.WORKLOADS))
@pytest.mark.parametrize("preset", ["tiny", "1b", "7b"])
def test_layout_tables_plan_without_launching(gpus, workload, preset):
    args = bench.parse_args(["--device", "cpu", "--gpus", str(gpus), "--preset", preset, "--workload", workload,
                             "--out", "unused"])
    bench.check_workload(args)
    plans = {p["name"]: p for p in (bench.plan(row, args) for row in args.rows)}
    assert len(plans) == len(bench.LAYOUTS[gpus]["deployments"])
    assert max(p["world"] for p in plans.values()) <= gpus
    for row in bench.LAYOUTS[gpus]["deployments"]:
        if row.get("baseline"):  # the bound compares the same language layout with and without the encoder
            base = plans[row["baseline"]]
            assert base["deployment"] == "homogeneous" and plans[row["name"]]["deployment"] == "heterogeneous"
            assert {k: v for k, v in row["language"].items() if k != "offset"} == \
                {k: v for k, v in next(r for r in bench.LAYOUTS[gpus]["deployments"]
                                       if r["name"] == row["baseline"])["language"].items() if k != "offset"}


def test_bad_batch_is_reported_before_launching(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--dry-run", "--batch", "6", "--out", "unused-never-written"])
    assert e.value.code == 2
    assert "deployment 'homogeneous'" in capsys.readouterr().err


def bridge_traffic(rank: int, world_size: int) -> dict:
    """One step of the fan-in layout (images DP 2 -> language TP 2), then `bridge_bandwidth` with the
    point-to-point calls spied on: the counts messages the bridge sent, the groups the plain send used."""
    import torch
    import torch.distributed as dist

    from mimo.training.metrics import Clock
    from mimo.training.step import MimoTrainer
    from tests.training.test_parity import IMG2_LANG_TP2, dataset, provider

    prov = provider(IMG2_LANG_TP2, ("images",))
    infra = prov.build_infra()
    trainer = MimoTrainer(prov.provide_distributed_model(), infra, hidden_size=64, global_batch_size=8,
                          num_microbatches=2, activation_dtype=torch.float64)
    batch = dataset(("images",)).batch(range(8))
    trainer.train_step(batch)
    names = {id(infra.p2p_groups.forward): "forward", id(infra.p2p_groups.backward): "backward"}
    seen = {"counts_messages": 0, "plain_send_groups": []}
    isend, send = dist.isend, dist.send

    def spy_isend(tensor, dst, group=None, tag=0):
        seen["counts_messages"] += not tensor.is_floating_point()  # rows and gradients are float
        return isend(tensor, dst, group=group, tag=tag)

    def spy_send(tensor, dst, group=None, tag=0):
        seen["plain_send_groups"].append(names.get(id(group), "default"))
        return send(tensor, dst, group=group, tag=tag)

    dist.isend, dist.send = spy_isend, spy_send
    try:
        result = bench.bridge_bandwidth(trainer, batch, Clock(torch.device("cpu")), reps=2)
    finally:
        dist.isend, dist.send = isend, send
    tokens = trainer.microbatch_tokens(batch, "images", 0)
    return {**seen, "bytes": result["bytes"], "expected_bytes": int(tokens.sum()) * 64 * 8,
            "bridge_wrapped": sorted(vars(trainer.bridges["images"]).keys() & {"_recv", "_broadcast"})}


def test_bridge_bandwidth_drives_the_bridge_as_the_step_does():
    """No counts message (every rank passes the micro-batch's token counts, as the step does), no probe wrapping
    the bridge, and the plain send on the bridge's own forward p2p group, with the micro-batch's bytes."""
    results = run_distributed(bridge_traffic, 4)
    assert [r["counts_messages"] for r in results] == [0, 0, 0, 0]
    assert all(r["bridge_wrapped"] == [] for r in results)
    sends = [g for r in results for g in r["plain_send_groups"]]
    assert sends == ["forward"] * 3, sends  # one warm-up and two timed repetitions, from the first images leader
    assert all(r["bytes"] == r["expected_bytes"] > 0 for r in results)


def test_sequence_parallel_rows_and_option():
    """`-sp` rows and `--sequence-parallel` (every TP module of every row) give mimo train's sequence_parallel."""
    args = bench.parse_args(["--device", "cpu", "--gpus", "2", "--preset", "tiny", "--out", "unused"])
    plans = {p["name"]: p for p in (bench.plan(row, args) for row in args.rows)}
    layout = plans["colocated-sp"]["config"].layout
    assert layout.get_parallelism("language").sequence_parallel
    assert not layout.get_parallelism("images").sequence_parallel
    assert not plans["colocated"]["config"].layout.get_parallelism("language").sequence_parallel
    assert plans["homogeneous-tp2-sp"]["layouts"] == {"images": "TP2+SPxDP1 r0-1", "language": "TP2+SPxDP1 r0-1"}
    args = bench.parse_args(["--device", "cpu", "--gpus", "4", "--preset", "tiny", "--out", "unused",
                             "--sequence-parallel"])
    for p in (bench.plan(row, args) for row in args.rows):
        for name, m in p["config"].layout.module_parallelisms.items():
            assert m.sequence_parallel == (m.tensor_model_parallel_size > 1), (p["name"], name)


class _SendPendingClock:
    """A GPU's clock (there is none here): the phase's own stream is done at once; the device 50 ms later, as
    when a heterogeneous encoder's send waits on a communication stream for the language rank's receive."""

    def __init__(self) -> None:
        self.pending = False

    def sync_stream(self) -> None:
        self.pending = True

    def sync(self) -> None:
        if self.pending:
            time.sleep(0.05)
        self.pending = False


def test_a_phases_pending_sends_count_as_blocked_not_busy():
    probe = bench.Probe.__new__(bench.Probe)  # only the timer: no trainer, no model
    probe.clock, probe.phase, probe.waits = _SendPendingClock(), "step", collections.defaultdict(float)
    seconds = collections.defaultdict(float)
    probe._timed(seconds, "images.forward", lambda: None)
    assert seconds["images.forward"] >= 0.05 and probe.waits["images.forward"] >= 0.05
    busy = seconds["images.forward"] - probe.waits["images.forward"]
    assert busy < 0.01  # the encoder's own work: nothing here (was the whole 50 ms)
    assert probe.phase == "step"


def test_an_fsdp_policy_without_fsdp_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", "--gpus", "2", "--reshard-after-forward", "never"])
    assert e.value.code == 2
    assert ("--reshard-after-forward never: FSDP2's policy, and --data-parallel is ddp; add --data-parallel fsdp"
            in capsys.readouterr().err)
    args = bench.parse_args(["--device", "cpu", "--gpus", "2", "--reshard-after-forward", "never",
                             "--data-parallel", "fsdp", "--only", "homogeneous-dp2"])
    assert bench.distributed_of(args.rows[0], args) == {"data_parallel": "fsdp", "reshard_after_forward": "never"}
    row = next(r for r in bench.LAYOUTS[2]["deployments"] if r["name"] == "homogeneous-dp2-fsdp-never-compile")
    assert bench.distributed_of(row, bench.parse_args(["--device", "cpu", "--gpus", "2"])) == {
        "data_parallel": "fsdp", "reshard_after_forward": "never"}  # a row's own policy wins
