"""benchmarks/cp_scaling.py (issue 30's two-GPU CP runs): its CPU dry run runs every mode and writes the JSON's fields.

Speed is never asserted (DESIGN §5). The dry run proves the commands the GPU session will run: each longest-row
probe is its own world (gloo, tiny preset, 2 layers), a probe past the simulated capacity (the stand-in for GPU
memory, which does not exist here) fails with torch.OutOfMemoryError and is reported while its world's other rank
is stopped, the searches find CP1's and CP2's longest rows, and the timed modes' jobs share one world per size.
"""

from __future__ import annotations

import json
import math
import time
import types

import pytest
import torch
from torch import nn

from tests.scripts import load_script

bench = load_script("cp_scaling", "cp_scaling")  # by this name: the workers import it so


def test_dry_run_writes_every_mode(tmp_path):
    out = tmp_path / "out.json"
    bench.main(["--dry-run", "--out", str(tmp_path), "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["env"]["functional_dry_run"] is True and report["env"]["backend"] == "gloo"
    longest, speed, encoder, curves = report["records"]
    assert [r["mode"] for r in report["records"]] == ["longest", "speed", "encoder", "curves"]

    # capacity 64 tokens per rank: CP1 holds 64, CP2 128; each search ended on a caught out-of-memory probe
    assert (longest["cp1_longest"], longest["cp2_longest"], longest["ratio"]) == (64, 128, 2.0)
    for run, failing in ((longest["cp1"], 128), (longest["cp2"], 256)):
        assert run["first_failing"] == failing and run["settled"] and not run["capped_at_max_length"]
        oom = [p for p in run["probes"] if "oom" in p]
        assert [p["length"] for p in oom] == [failing] and "simulated" in oom[0]["oom"]
        assert all(p["peak_gb"] > 0 and p["layers"] == 2 for p in run["probes"] if "oom" not in p)

    assert [(r["cp"], r["dp"], r["length"]) for r in speed["rows"]] == [(1, 1, 64), (2, 1, 64), (2, 1, 64),
                                                                       (1, 2, 64)]
    assert speed["at_longest"] == 64  # CP1's longest found above
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in speed["rows"])
    assert speed["cp2_over_cp1"] > 0 and speed["cp2_over_dp2_at_longest"] > 0

    assert all(r["encoder_ms"] > 0 and r["world"] == 2 for r in encoder["rows"])
    once, everyone = encoder["rows"]  # 2 documents of one image: one a rank, or both (Megatron's way)
    assert (once["encoded_images"], everyone["encoded_images"]) == (1, 2)
    assert encoder["ratio"] > 0 and "whole image set" in encoder["replicated_means"]

    one, two = curves["rows"]
    assert len(one["losses"]) == len(two["losses"]) == 2 and all(math.isfinite(x) for x in one["losses"])
    assert one["losses"][0] != one["losses"][1]  # each step on its own data
    assert curves["relative_difference"] <= 1e-5  # float32: CP2 is CP1's computation split


class Counting(nn.Linear):
    """A stand-in encoder that records the batch of each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return super().forward(x)


def test_replicated_encoder_encodes_cp_copies_and_keeps_one():
    torch.manual_seed(0)
    encoder = Counting(3, 2)
    encoder.batches = batches = []
    model = types.SimpleNamespace(modality_submodules={"images": types.SimpleNamespace(encoder=encoder)})
    x = torch.randn(5, 3)
    want = encoder(x)
    bench.replicate_encoder(model, 2)
    got = encoder(x)
    assert batches == [5, 10] and torch.equal(got, want)


def test_longest_starts_no_probe_past_the_budget():
    """The search stops before a probe whose estimate (start-up, plus the step scaled by the length squared)
    would end past --budget-s: a 10-minute device call keeps what it found."""
    probes = [{"length": 64, "step_s": 1.0, "probe_s": 3.0}]  # 2 s of start-up, a 1 s step
    started = time.perf_counter()
    assert bench.affordable(64, probes, started, 5.0)  # about 3 s
    assert not bench.affordable(128, probes, started, 5.0)  # about 2 + 4 s
    assert bench.affordable(128, probes, started, 10.0)
    assert bench.affordable(1 << 20, [], started, 10.0)  # a search's first probe: if any time is left


def test_bad_command_lines_say_what_is_wrong_in_one_line(capsys, tmp_path):
    for argv, says in ((["--device", "cpu"], "nothing to run"),
                       (["--speed", "--device", "cpu", "--length", "1000"], "needs >= 2440 tokens"),
                       (["--longest", "--device", "cpu", "--preset", "nope"], "unknown LLaVA preset 'nope'"),
                       (["--longest", "--device", "cpu", "--start", "20000"], "multiple of --granule 1024")):
        with pytest.raises(SystemExit):
            bench.parse_args([*argv, "--out", str(tmp_path)])
        assert says in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("start", [64, 512])
def test_search_doubles_or_halves_then_bisects_to_the_resolution(start):
    tried = []

    def fits(length: int) -> bool:
        tried.append(length)
        return length <= 100

    args = types.SimpleNamespace(started=time.perf_counter(), max_length=1 << 20, granule=8, resolution=0.05)
    good, bad, _, settled = bench.bounds(fits, start, [], args, 1e9)
    assert (good, bad, settled) == (96, 104, True)  # within one granule
    assert tried[-3:] == [96, 112, 104]
    assert bench.out_of_memory(RuntimeError("CUDA error: out of memory")) and not bench.out_of_memory(ValueError("x"))
