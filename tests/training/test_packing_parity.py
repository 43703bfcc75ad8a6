"""Packing parity (issue 15): with `data.packing`, every layout trains like the unpacked single-process model.

float64, 3 steps of AdamW with clipping, on samples of very different lengths (2 to ~200 tokens) with 0, 1
or 3 images, some with unscored trailing text (which packing drops); every step's loss and gradient norm and
every final parameter equal the *unpacked* reference to a relative 1e-8, on a world of one and on the
deployments of the parity matrix (DP, TP, PP, colocated, heterogeneous fan-in, tied embeddings over PP).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mimo.data.packing as packing_module
import mimo.training.step as step_module
from mimo.data import ModalitySpec, SyntheticDataset
from mimo.data.packing import PackedText, PaddedText, TextLayout, sample_extents
from mimo.distributed import DistributedConfig, ModuleDistributedConfig
from mimo.models import ViTConfig
from mimo.models.labels import IGNORE_INDEX
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.step import MimoTrainer
from tests.test_train_cli import metrics, mimo, steps_and_losses, write_config
from tests.training.test_parity import (
    CLIP,
    GLOBAL_BATCH,
    IMG2_LANG_TP2,
    IMG2_LANG_TP2_SP,
    MICRO,
    OPTIM,
    SP,
    STEPS,
    full_params,
    provider,
    train_one_process,
)

HOMOGENEOUS = {"images": {}, "language": {}}


def batches() -> list:
    """Samples of 2..~200 tokens; every third one's last 6 labels unscored (a trailing unscored turn)."""
    data = SyntheticDataset(64, {"images": ModalitySpec.image(256, ViTConfig.tiny().tokens_per_image)},
                            items_per_sample=(0, 1, 3), text_length=(0, 40), seed=11, dtype=torch.float64)
    out = []
    for s in range(STEPS):
        batch = data.batch(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH))
        for i in range(0, GLOBAL_BATCH, 3):
            n = int((batch.labels[i] != IGNORE_INDEX).sum())
            batch.labels[i, max(n - 6, 0):n] = IGNORE_INDEX
        out.append(batch)
    return out


_REFERENCE: dict = {}


def reference() -> tuple[list, list, dict]:
    """The unpacked single-process run (the parity suite's loop), computed once."""
    if not _REFERENCE:
        model = provider(None, ("images",)).provide()
        losses, norms = train_one_process(model, batches())
        _REFERENCE.update(losses=losses, norms=norms,
                          params={n: p.detach().clone() for n, p in model.named_parameters()})
    return _REFERENCE["losses"], _REFERENCE["norms"], _REFERENCE["params"]


def train_packed(rank: int, world_size: int, layout: dict, tied: bool, dp_kind: str, text: TextLayout) -> dict:
    """Train STEPS with `text` (packed rows, or padded ones widened) on this rank's part; return the losses,
    norms and parameters it holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prov = provider(layout, ("images",), tied)
        model = prov.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(dp_kind)))
    trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                          num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64,
                          text_layout=text)
    results = [trainer.train_step(batch) for batch in batches()]
    return {"losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
            "params": full_params(model)}


MATRIX = [
    # id, world, layout, tied, dp kind, text layout
    ("single-process", 1, HOMOGENEOUS, False, "ddp", PackedText(1)),
    ("homogeneous-dp2", 2, HOMOGENEOUS, False, "ddp", PackedText(16)),
    ("homogeneous-tp2", 2, {"images": {"tensor_model_parallel_size": 2},
                            "language": {"tensor_model_parallel_size": 2}}, False, "ddp", PackedText(1)),
    ("colocated-dp4-pp2dp2", 4, {"images": {"data_parallel_size": 4},
                                 "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 2}},
     False, "ddp", PackedText(8)),
    ("heterogeneous-fan-in-dp2-tp2", 4, IMG2_LANG_TP2, False, "ddp", PackedText(1)),
    ("homogeneous-tp2-sp", 2, {"images": {"tensor_model_parallel_size": 2, **SP},
                               "language": {"tensor_model_parallel_size": 2, **SP}}, False, "ddp", PackedText(1)),
    ("heterogeneous-fan-in-dp2-tp2sp", 4, IMG2_LANG_TP2_SP, False, "ddp", PackedText(1)),
    ("heterogeneous-tied-pp2-fsdp", 4, {"images": {"data_parallel_size": 2},
                                        "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1,
                                                     "rank_offset": 2}}, True, "fsdp", PackedText(1)),
    # padded rows widened to a multiple (compiled TP on a GPU: few widths to compile), TP as that case
    ("homogeneous-tp2-padded-64", 2, {"images": {"tensor_model_parallel_size": 2},
                                      "language": {"tensor_model_parallel_size": 2}}, False, "ddp", PaddedText(64)),
]


@pytest.mark.parametrize(("name", "world", "layout", "tied", "dp_kind", "text"), MATRIX,
                         ids=[row[0] for row in MATRIX])
def test_packed_training_matches_the_unpacked_reference(name, world, layout, tied, dp_kind, text):
    if tied:  # the reference of a tied model is its own unpacked run
        model = provider(None, ("images",), tied).provide()
        ref_losses, ref_norms = train_one_process(model, batches())
        ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        ref_losses, ref_norms, ref_params = reference()
    results = run_distributed(train_packed, world, layout, tied, dp_kind, text, timeout_s=240)
    worst, seen = 0.0, set()
    for rank, res in enumerate(results):
        for what, got_all, want_all in (("loss", res["losses"], ref_losses), ("norm", res["norms"], ref_norms)):
            for s, (got, want) in enumerate(zip(got_all, want_all, strict=True)):
                rel = abs(got - want) / abs(want)
                assert rel <= 1e-8, f"{name}: rank {rank} step {s} {what} {got!r} != unpacked {want!r} ({rel:.1e})"
                worst = max(worst, rel)
        params = {n if n in ref_params else n.replace("lm_head", "embed_tokens"): p for n, p in res["params"].items()}
        worst = max(worst, assert_matches_reference(params, ref_params, f"{name}: rank {rank} parameter"))
        seen.update(params)
    assert seen == set(ref_params), f"{name}: parameters nobody holds: {sorted(set(ref_params) - seen)}"
    print(f"\n{name}: largest relative difference to the unpacked run {worst:.1e}")


def homogeneous_trainer(text_layout: PackedText | None) -> MimoTrainer:
    """A trainer of the homogeneous layout over this world, text laid out as asked (None: padded)."""
    prov = provider(HOMOGENEOUS, ("images",))
    return MimoTrainer(prov.provide_distributed_model(), prov.build_infra(), hidden_size=64,
                       global_batch_size=GLOBAL_BATCH, num_microbatches=MICRO, optimizer=OPTIM,
                       activation_dtype=torch.float64, text_layout=text_layout)


def packed_tokens(rank: int, world_size: int) -> list[int]:
    """The row length the packed step gives the language model, per micro-batch, on a world of one."""
    trainer = homogeneous_trainer(PackedText())
    batch = batches()[0]
    trainer.train_step(batch)
    return [t.input_ids.shape[1] for t in trainer._state.host_text]


def test_packing_feeds_fewer_positions_than_padding():
    """The point of packing: the rows hold less than micro-batch × padded width (the batch has long and short
    samples)."""
    batch = batches()[0]
    padded = GLOBAL_BATCH // MICRO * batch.input_ids.shape[1]
    lengths = run_distributed(packed_tokens, 1)[0]
    assert all(n < padded for n in lengths), (lengths, padded)


def token_counts(rank: int, world_size: int, multiple: int | None) -> dict:
    """One step on DP2, packed to `multiple` (None: padded): the step's token counts, the batch's real tokens
    and the positions this rank's language rows hold."""
    trainer = homogeneous_trainer(None if multiple is None else PackedText(multiple))
    batch = batches()[0]
    result = trainer.train_step(batch)
    extents = sample_extents(batch.input_ids, batch.labels, trainer.special_token_ids)
    return {"tokens": result.tokens, "positions": result.positions, "documents": result.documents,
            "real": int(extents.sum()), "extents": [int(n) for n in extents if n > 0],
            "rows": sum(t.input_ids.numel() for t in trainer._state.host_text), "padded": batch.input_ids.numel()}


@pytest.mark.parametrize("multiple", [None, 16], ids=["padded", "packed"])
def test_tokens_count_real_tokens_and_positions_what_the_model_computed(multiple):
    """`tokens` leaves padding out, packed or not; `positions` sums every DP replica's language rows (padding
    and a packed row's tail included)."""
    a, b = run_distributed(token_counts, 2, multiple)
    assert a["tokens"] == b["tokens"] == a["real"] < a["padded"]
    assert a["positions"] == b["positions"] == a["rows"] + b["rows"]
    assert a["positions"] == a["padded"] if multiple is None else a["real"] < a["positions"] < a["padded"]
    # the documents the FLOP count needs come with the step's result: each kept sample's length when packed
    assert a["documents"] == b["documents"] == (None if multiple is None else tuple(a["extents"]))


def test_mimo_train_with_data_packing_logs_the_unpacked_losses(tmp_path):
    """`data.packing: true` reaches the step from the YAML: a float64 `mimo train` logs the losses of the same
    run without packing."""
    losses, counts, flops = {}, {}, {}
    for packing in (False, True):
        path, run_dir = write_config(tmp_path / str(packing), train={"steps": 2}, data={"packing": packing})
        done = mimo("train", str(path), "--quiet")
        assert done.returncode == 0, done.stderr[-3000:]
        losses[packing] = steps_and_losses(run_dir)
        counts[packing] = [(m["tokens"], m["positions"]) for m in metrics(run_dir) if m["kind"] == "train"]
        flops[packing] = [m["tflops"] * m["step_time_s"] for m in metrics(run_dir) if m["kind"] == "train"]
    assert sorted(losses[True]) == [1, 2]
    for step, want in losses[False].items():
        assert abs(losses[True][step] - want) <= 1e-8 * abs(want), (step, losses)
    for (tokens, padded), (packed_tokens, packed) in zip(counts[False], counts[True], strict=True):
        assert tokens == packed_tokens <= packed < padded, counts  # real tokens: the same work, packed or not
    # TFLOP/s counts the FLOPs of the rows computed: fewer packed (no padding, attention within each sample)
    assert all(p < 0.9 * u for p, u in zip(flops[True], flops[False], strict=True)), flops


def too_long(rank: int, world_size: int, packed: bool) -> str:
    """The trainer's message for a batch whose longest sample exceeds max_seq_len (256), packed or not."""
    prov = provider(HOMOGENEOUS, ("images",))
    trainer = MimoTrainer(prov.provide_distributed_model(), prov.build_infra(), hidden_size=64,
                          global_batch_size=GLOBAL_BATCH, num_microbatches=MICRO, activation_dtype=torch.float64,
                          text_layout=PackedText() if packed else None)
    data = SyntheticDataset(8, {"images": ModalitySpec.image(256, ViTConfig.tiny().tokens_per_image)},
                            items_per_sample=(3,), text_length=(60, 60), seed=1, dtype=torch.float64)
    try:
        trainer.train_step(data.batch(range(GLOBAL_BATCH)))
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_sample_longer_than_max_seq_len_is_one_clear_error(packed):
    # bos + 60 + 3 × (16 image tokens + query + answer + 60) + eos = 296 positions, 295 of them kept when packed
    longest = 295 if packed else 296
    assert run_distributed(too_long, 1, packed)[0] == (
        f"sequence length {longest} exceeds the language model's max_seq_len 256; drop or shorten the longer samples")


def extents_calls(rank: int, world_size: int) -> int:
    """How many times one packed step computes `sample_extents` on this rank (spied where it is looked up)."""
    calls, real = [0], packing_module.sample_extents

    def spy(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    packing_module.sample_extents = step_module.sample_extents = spy
    try:
        homogeneous_trainer(PackedText()).train_step(batches()[0])
    finally:
        packing_module.sample_extents = step_module.sample_extents = real
    return calls[0]


def test_a_step_finds_the_sample_extents_once():
    """The layout and the token counts read one host computation of the extents, not one per micro-batch share."""
    assert run_distributed(extents_calls, 1) == [1]
