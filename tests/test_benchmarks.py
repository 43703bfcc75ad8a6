"""benchmarks/llava_speed.py runs on CPU with the tiny preset (one step) and its levers compute the right thing;
benchmarks/data_wait.py runs its CPU dry run; benchmarks/ddp_overhead.py its tiny CPU check; benchmarks/qwen_speed.py
its tiny CPU run.

Speed is never asserted here (DESIGN §5): only that the script runs, prints the rows and that the chunked
cross-entropy it offers as a lever equals `Decoder.loss`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mimo.models import Decoder, DecoderConfig
from mimo.testing import run_distributed
from tests.scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "llava_speed.py"
TINY = ["--presets", "tiny", "--device", "cpu", "--warmup", "0", "--steps", "1", "--profile-steps", "1"]


def _load_script():
    return load_script("llava_speed", "llava_speed")


def _run(tmp_path: Path, *extra: str) -> tuple[str, list[dict]]:
    out = tmp_path / "records.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())["records"]


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def test_tiny_cpu_run_prints_mimo_and_plain_rows(tmp_path):
    stdout, records = _run(tmp_path)
    rows = {r["row"]: r for r in records}
    assert set(rows) == {"mimo", "plain", "hf"}
    for name in ("mimo", "plain"):
        r = rows[name]
        assert "error" not in r, r.get("traceback", r)
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and math_finite(r["loss_last"])
        assert r["encoder_ms"] >= 0 and r["projector_ms"] >= 0 and r["language_ms"] > 0
        assert f"| tiny {name} | 1 |" in stdout
    if _has_transformers():
        assert "error" not in rows["hf"] and rows["hf"]["tokens_per_s"] > 0
    else:
        assert "skipped" in rows["hf"]
        assert "| tiny hf | - | skipped: transformers is not installed" in stdout
    assert "| row | µbatches | step ms | tokens/s | TFLOP/s | MFU |" in stdout
    assert "framework tax" in stdout
    # every row counts its FLOPs with mimo's formulas: the same number for every row of a preset
    assert len({r["step_tflop"] for r in records}) == 1


def test_tiny_cpu_levers_run_and_unknown_ones_are_reported(tmp_path):
    rows = ("plain+chunkce+sac+mimoclip+syncs@2,plain+foreach,mimo+noddp+chunkce+nocheck,"
            "mimo+bucketview+recompute+stage2,plain+recompute,mimo+fp8,plain+warp")
    _, records = _run(tmp_path, "--rows", rows)
    for r in records[:-3]:
        assert "error" not in r, (r["row"], r.get("traceback", r))
    assert records[0]["microbatches"] == 2
    assert records[2]["notes"] == ["no DDP"]
    assert records[-3]["error"] == "lever(s) ['recompute'] are run settings of the mimo row"
    assert "fp8 'tensorwise' needs" in records[-2]["error"], "fp8 on the CPU is mimo's one-line refusal"
    assert "unknown" in records[-1]["error"] and "warp" in records[-1]["error"]


def test_loss_curve_feeds_every_row_the_same_batches_and_fp8_rows_are_compared():
    """`--loss-curve`: step i of every row trains on the batch of seed i; an fp8 row is compared with the row of the
    same name without the lever (tokens/s, or the mean loss over the last 50 steps)."""
    bench = _load_script()
    ctx = types.SimpleNamespace(preset="tiny", batch=bench.make_batch("tiny", 4, 64)[1])
    fed: list[list[torch.Tensor]] = [[], []]
    for seen in fed:
        row = bench.Row(step=None, loss=lambda: 2.5, parts=None, step_on=lambda b, seen=seen: seen.append(b.input_ids))
        record = bench.loss_curve(row, ctx, 3)
        assert record["losses"] == [2.5] * 3
    assert all(torch.equal(a, b) for a, b in zip(*fed, strict=True)) and not torch.equal(fed[0][0], fed[0][1])
    assert bench.without_fp8("mimo+compile+fp8@2") == "mimo+compile@2"
    records = [{"preset": "1b", "row": "mimo+compile", "losses": [9.0] + [2.0] * 50},
               {"preset": "1b", "row": "mimo+compile+fp8", "losses": [9.0] + [2.01] * 50},
               {"preset": "1b", "row": "mimo", "tokens_per_s": 100.0},
               {"preset": "1b", "row": "mimo+fp8row", "tokens_per_s": 125.0},
               {"preset": "1b", "row": "plain+fp8", "error": "lever(s) ..."}]
    assert bench.fp8_comparisons(records) == [
        "1b: loss over the last 50 steps, mimo+compile+fp8 2.0100 vs mimo+compile 2.0000: relative difference 0.50% "
        "(target <= 1%)", "1b: mimo+fp8row / mimo tokens/s = 1.250 (target >= 1.0 at 1b, >= 1.2 at 7B)"]


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


@pytest.mark.parametrize("chunk", [5, 4096])
def test_chunked_cross_entropy_equals_decoder_loss(monkeypatch, chunk):
    """Loss and both gradients (hidden, head weight) of the chunked lever match Decoder.loss in float64."""
    bench = _load_script()
    monkeypatch.setattr(bench, "CE_CHUNK", chunk)
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig.tiny()).double()
    hidden = torch.randn(3, 7, 64, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 256, (3, 7))
    labels[0, :3] = -100
    expected, count = decoder.loss(hidden, labels)
    grads = torch.autograd.grad(expected * 0.5, [hidden, decoder.lm_head.weight])
    loss, count2 = bench.chunked_ce_loss(decoder, hidden, labels)
    got = torch.autograd.grad(loss * 0.5, [hidden, decoder.lm_head.weight])
    assert int(count) == int(count2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_data_wait_dry_run_measures_the_loader_with_and_without_workers(tmp_path):
    """benchmarks/data_wait.py --dry-run: tiny preset on the CPU, JPEGs decoded through real loader workers."""
    out = tmp_path / "data_wait.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "data_wait.py"), "--dry-run", "--workers", "0,1",
                           "--steps", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [r["num_workers"] for r in result["records"]] == [0, 1]
    for r in result["records"]:
        assert 0 <= r["wait_pct"] <= 100 and r["step_ms_mean"] > 0 and math_finite(r["loss_last"])
    assert result["env"]["build_ms"] > 0 and result["env"]["jpeg_mb"] > 0
    assert "| 1 | " in proc.stdout


def test_ddp_overhead_runs_each_variant_in_its_own_process(tmp_path):
    out = tmp_path / "ddp.jsonl"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "ddp_overhead.py"), "--preset", "tiny", "--warmup", "1",
                           "--steps", "1", "--variant", "none,mimo,mimo-split-copy", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["none", "mimo", "mimo-split-copy"]
    assert all(r["step_s"] > 0 and r["device"] == "cpu" for r in rows)


def test_qwen_speed_tiny_cpu_run_prints_a_json_line_per_row_and_the_ratios(tmp_path):
    """benchmarks/qwen_speed.py --tiny: every row (mimo's step, HF padded and packed, both towers alone) trains a
    step on the CPU; one JSON line each as it ends, then mimo / HF; FLOPs from mimo.flops, the ViT's windowed and
    full attention apart."""
    out = tmp_path / "qwen.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "qwen_speed.py"), "--tiny", "--warmup", "0", "--samples",
                           "2", "--microbatches", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = {r["row"]: r for r in lines if "row" in r}
    assert list(rows) == ["mimo", "hf", "hf+packed", "vit-mimo", "vit-hf"]
    for r in rows.values():
        assert "error" not in r, r
        assert r["tflops"] > 0 and math_finite(r["loss"]) and (r.get("tokens_per_s") or r["patches_per_s"]) > 0
    assert [r["ratio"] for r in lines if "ratio" in r] == ["mimo / hf", "mimo / hf+packed", "vit-mimo / vit-hf"]
    env = json.loads(out.read_text())["env"]
    step = env["step_tflop"]
    assert step["vision_full_attention"] > 0 and step["vision_window_attention"] > 0
    assert step["total"] == pytest.approx(step["language"] + step["vision"])
    assert env["padded_positions"] >= env["tokens_per_step"]  # HF's padded rows hold every real token


def _qwen_row_losses(rank: int, world_size: int, directory: str) -> tuple[float, float, float]:
    """The tiny run's first-step loss from HF's padded and packed micro-batches and from mimo's step, mimo reading
    the weights HF saved (float32, a world of one)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mimo.families.qwen_vl import open_qwen_vl

    q = load_script("qwen_speed", "qwen_speed")
    config = q.model_config(q.TINY)
    spec = q.qwen_vl_spec(config)
    data = q.make_data(spec, q.TINY, seed=0, pin=False)
    ctx = q.Context(q.TINY, config, spec, data, torch.device("cpu"), "sdpa")
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(q.hf_config(ctx)).save_pretrained(directory)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, attn_implementation="sdpa")
    with torch.no_grad():
        padded, packed = (sum(float(hf(**m, num_items_in_batch=data.label_tokens, use_cache=False).loss)
                              for m in micro) for micro in (data.hf_padded, data.hf_packed))
    opened = open_qwen_vl(directory)
    assert opened.spec == spec
    row = q.build_mimo(dataclasses.replace(ctx, weights=opened.weights()))
    row.step()
    return padded, packed, row.loss()


def test_qwen_speed_rows_compute_one_loss_from_one_set_of_weights(tmp_path):
    """The rows train the same thing: on one set of weights, HF's padded micro-batches (attention mask, M-RoPE
    positions), its packed rows (4-row positions) and mimo's packed step give one loss: the labels, positions and
    masks the script builds agree."""
    padded, packed, mimo = run_distributed(_qwen_row_losses, 1, str(tmp_path))[0]
    assert padded == pytest.approx(mimo, rel=1e-5) and packed == pytest.approx(mimo, rel=1e-5), (padded, packed, mimo)


def test_qwen_speed_hf_vision_blocks_take_torch_varlen_through_their_cu_seqlens_path(monkeypatch):
    """`--hf-vision-attn torch-varlen`: HF's tower hands every attention call its cu_seqlens and computes what its
    sdpa path computes. torch's varlen kernel is CUDA-only, so mimo's `varlen_attention` is replaced here by SDPA
    per segment (the kernel's own equality to SDPA: tests/models/test_packed_attention_cuda.py)."""
    import torch.nn.functional as F

    import mimo.models.attention as attention

    def per_segment(q, k, v, cu_seqlens, longest, options):
        bounds = cu_seqlens.tolist()
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                          for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=2)

    monkeypatch.setattr(attention, "varlen_attention", per_segment)
    monkeypatch.setattr(attention, "varlen_options", lambda causal: {})
    q = load_script("qwen_speed", "qwen_speed")
    config = q.model_config(q.TINY)
    spec = q.qwen_vl_spec(config)
    data = q.make_data(spec, q.TINY, seed=0, pin=False)
    calls = []
    monkeypatch.setattr(q, "torch_varlen_attention", lambda *a, _f=q.torch_varlen_attention, **kw: (
        calls.append(kw.get("cu_seq_lens_q") is not None), _f(*a, **kw))[1])
    losses = []
    for vision_attn in (None, "torch-varlen"):
        torch.manual_seed(0)
        row = q.build_vit_hf(q.Context(q.TINY, config, spec, data, torch.device("cpu"), "sdpa",
                                       hf_vision_attn=vision_attn))
        row.step()
        losses.append(row.loss())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert calls and all(calls)  # every call of the varlen row, with its cu_seqlens
