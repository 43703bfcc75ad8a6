"""benchmarks/hf_rows.py and step_profile.py: the HF baseline rows train beside mimo's, and the profile summary
counts busy, idle and exposed-communication time right.

Speed is never asserted: the dry run (gloo, tiny preset) proves that an HF + DDP row and an HF + FSDP2 row of
the two-GPU table launch, train on the global batches mimo's rows train on, and report. The profile summary is
checked on hand-made kernel intervals (its CUDA input cannot exist here).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.scripts import BENCHMARKS, load_script

step_profile = load_script("step_profile", "step_profile_bench")


def test_profile_summary_splits_busy_idle_and_exposed_communication():
    kernels = [("gemm", 0.0, 4.0), ("ncclDevKernel_AllReduce", 3.0, 6.0), ("gemm", 5.0, 7.0),
               ("Memcpy DtoD", 8.0, 9.0), ("ncclDevKernel_AllReduce", 9.5, 10.0)]
    s = step_profile.summarize_kernels(kernels, wall_ms=12.0, top=2)
    assert s["gpu_busy_ms"] == pytest.approx(7.0 + 1.0 + 0.5)  # [0, 7], [8, 9], [9.5, 10]
    assert s["gpu_idle_ms"] == pytest.approx(12.0 - 8.5)
    assert s["compute_ms"] == pytest.approx(6.0)  # gemm [0, 4] and [5, 7]
    assert s["comm_ms"] == pytest.approx(3.5)
    assert s["comm_exposed_ms"] == pytest.approx(1.0 + 0.5)  # [4, 5] and [9.5, 10]: no compute beside them
    assert s["copy_ms"] == pytest.approx(1.0)
    assert [k["name"] for k in s["top_kernels"]] == ["gemm", "ncclDevKernel_AllReduce"]
    assert s["top_kernels"][0] == {"name": "gemm", "ms": 6.0, "count": 2}


def test_hf_inputs_move_the_image_id_into_the_vocabulary_and_shift_labels():
    import torch

    hf_rows = load_script("hf_rows", "hf_rows_bench")
    from mimo.data import MimoBatch, next_token_labels
    from mimo.models import ModalityBatch

    ids = torch.tensor([[1, 300, 300, 5, 6, 7]])
    batch = MimoBatch(ids, next_token_labels(ids[0]).unsqueeze(0),
                      {"images": ModalityBatch(torch.zeros(1, 3, 8, 8), torch.tensor([1]))})
    out = hf_rows.hf_inputs(batch, image_token_id=300, vocab_size=256)
    assert out["input_ids"].tolist() == [[1, 255, 255, 5, 6, 7]]
    # mimo's labels [300, 300, 5, 6, 7, -]: image targets and image positions (the last image predicting 5) are
    # never scored; HF scores position t against labels[t + 1], so the targets 6, 7 move one to the right
    assert out["labels"].tolist() == [[-100, -100, -100, -100, 6, 7]]


# deployments.py's main, its first free port taken before the agent's store binds it (by another job's store or
# NCCL's sockets, say): the launch must go on on another port. (Once its rendezvous was c10d's, which then joined
# whatever listened on the port and hung there: a CI run lost 420 s so.)
PORT_TAKEN = """
import socket, sys
sys.path.insert(0, sys.argv[1])
import deployments
import mimo.launch as launch

held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
ports, free = [held.getsockname()[1]], launch._free_port
launch._free_port = lambda: ports.pop() if ports else free()
sys.argv = ["deployments.py", *sys.argv[2:]]
report = deployments.main()
print("first port tried:", not ports)
sys.exit(1 if any("error" in r for r in report["rows"]) else 0)
"""


def test_dry_run_trains_the_hf_rows(tmp_path):
    out = tmp_path / "d"  # (mimo's rows: tests/test_benchmark_deployments.py's dry run)
    proc = subprocess.run([sys.executable, "-c", PORT_TAKEN, str(BENCHMARKS), "--dry-run", "--gpus", "2",
                           "--only", "hf-ddp,hf-fsdp", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "first port tried: True" in proc.stdout
    rows = {r["name"]: r for r in json.loads((out / "deployments.json").read_text())["rows"]}
    assert list(rows) == ["hf-ddp", "hf-fsdp"]
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["world"] == 2 and r["tokens_per_s"] > 0 and len(r["losses"]) == 2
        assert all(math.isfinite(x) for x in r["losses"])
    assert rows["hf-ddp"]["deployment"] == "hf-ddp" and rows["hf-fsdp"]["deployment"] == "hf-fsdp"
    # DDP and FSDP2 train one model from one init on one batch sequence: the same losses (float32, gloo)
    assert rows["hf-fsdp"]["losses"] == pytest.approx(rows["hf-ddp"]["losses"], rel=1e-5)
    assert (out / "tokens_per_gpu.png").stat().st_size > 0


def tuned_ddp(rank: int, world_size: int, tuned: bool) -> tuple[bool, bool]:
    """The HF + DDP row's wrapper, tuned or not: its bucket views and dynamo's DDP optimizer setting."""
    import torch

    from mimo.families.llava import LlavaMimoProvider

    sys.path.insert(0, str(BENCHMARKS))  # hf_rows imports its neighbours, as deployments.py runs it
    hf_rows = load_script("hf_rows", "hf_rows_bench")
    model, _ = hf_rows.build_model(LlavaMimoProvider.preset("tiny"), "ddp", torch.device("cpu"), False, tuned)
    return model.gradient_as_bucket_view, torch._dynamo.config.optimize_ddp


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_the_tuned_hf_ddp_row_takes_mimos_ddp_settings():
    from mimo.testing import run_distributed

    assert run_distributed(tuned_ddp, 1, True) == [(True, False)]
    assert run_distributed(tuned_ddp, 1, False) == [(False, True)]  # a fresh process: torch's defaults
