"""Context parallelism of the language model (issue 25): every CP layout trains like the single-process model.

float64, 3 steps of AdamW with clipping (the parity suite's loop and batches: samples of 0, 1 or 3 images, uneven
text); every step's loss and gradient norm and every final parameter equal the one-process reference to 1e-8.
The rows share spawned worlds of four ranks (one world runs several layouts one after another: start-up is paid
once): CP beside TP, PP, DP (DDP and FSDP2), packing, colocated and heterogeneous encoders.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mimo.config import MimoParallelismConfig
from mimo.context_parallel import PAD, split_columns, split_text
from mimo.data.packing import LanguageText, PackedText, PaddedText, sample_extents
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, WrapError, check_distributed, unwrap
from mimo.models import Decoder, DecoderConfig, ViTConfig
from mimo.models.labels import IGNORE_INDEX
from mimo.models.rotary import MRopeLayout
from mimo.testing import assert_matches_reference, run_distributed
from mimo.training.checkpoint import Checkpointer
from mimo.training.step import MimoTrainer
from tests.training import test_checkpoint as checkpointing
from tests.training import test_packing_parity as packing
from tests.training import test_parity as parity
from tests.training.test_parity import (
    CLIP,
    GLOBAL_BATCH,
    MICRO,
    OPTIM,
    batches,
    cached_reference,
    full_params,
    provider,
    train_one_process,
)

IMAGES = ("images",)
CP2 = {"context_parallel_size": 2}
# id, layout (4 ranks), data parallel kind (-recompute: every block recomputed), text layout, data ("parity": the
# parity suite's; "short": `short_batches`)
ROWS = [
    ("colocated-images-dp4-lm-cp2dp2", {"images": {"data_parallel_size": 4},
                                        "language": {**CP2, "data_parallel_size": 2}}, "ddp", PaddedText(), "parity"),
    ("lm-cp2-tp2", {"images": {"data_parallel_size": 4},
                    "language": {**CP2, "tensor_model_parallel_size": 2, "data_parallel_size": 1}}, "ddp",
     PaddedText(), "parity"),
    ("lm-cp2-pp2", {"images": {"data_parallel_size": 4},
                    "language": {**CP2, "pipeline_model_parallel_size": 2, "data_parallel_size": 1}}, "ddp",
     PaddedText(), "parity"),
    ("heterogeneous-images-dp2-lm-cp2", {"images": {"data_parallel_size": 2},
                                         "language": {**CP2, "data_parallel_size": 1, "rank_offset": 2}}, "ddp",
     PaddedText(), "parity"),
    ("lm-cp2-dp2-fsdp", {"images": {"data_parallel_size": 4}, "language": {**CP2, "data_parallel_size": 2}}, "fsdp",
     PaddedText(), "parity"),
    ("lm-cp2-dp2-packed", {"images": {"data_parallel_size": 4}, "language": {**CP2, "data_parallel_size": 2}}, "ddp",
     PackedText(), "short"),
    ("colocated-images-dp4-lm-cp4", {"images": {"data_parallel_size": 4},
                                     "language": {"context_parallel_size": 4, "data_parallel_size": 1}}, "ddp",
     PaddedText(), "parity"),
    # homogeneous: the encoder has the language model's layout, its CP ranks each encoding a share of a replica's images
    ("homogeneous-cp2-dp2", {"images": {**CP2, "data_parallel_size": 2}, "language": {**CP2, "data_parallel_size": 2}},
     "ddp", PaddedText(), "parity"),
    # sequence parallelism inside each CP rank's chunks, every block recomputed (the CP core recomputes inside)
    ("lm-cp2-tp2-sp-recompute", {"images": {"data_parallel_size": 4},
                                 "language": {**CP2, "tensor_model_parallel_size": 2, "data_parallel_size": 1,
                                              "sequence_parallel": True}}, "ddp-recompute", PaddedText(), "parity"),
]
SHORT = 3  # a sample of 3 positions: fewer than the 2·CP = 4 chunks its packed document is cut into


def short_batches() -> list:
    """The packing suite's batches (2 to ~200 tokens), with one text-only sample of step 1 cut to SHORT positions."""
    steps = packing.batches()
    first = steps[0]
    text_only = (first.modality_inputs["images"].items_per_sample == 0).nonzero().flatten().tolist()
    first.labels[text_only[0], SHORT:] = IGNORE_INDEX
    return steps


def data_of(name: str) -> list:
    """A row's batches by data name."""
    return batches(IMAGES) if name == "parity" else short_batches()


def train_rows(rank: int, world_size: int, rows: list) -> list[dict]:
    """Each row's STEPS on this rank's part, one after another in this world: losses, norms, parameters held."""
    out = []
    for _, layout, dp_kind, text, data in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prov = provider(layout, IMAGES)
            data_parallel, _, recompute = dp_kind.partition("-")
            settings = ModuleDistributedConfig(data_parallel, recompute_granularity="full" if recompute else "none")
            model = prov.provide_distributed_model(DistributedConfig(settings))
        trainer = MimoTrainer(model, prov.build_infra(), hidden_size=64, global_batch_size=GLOBAL_BATCH,
                              num_microbatches=MICRO, optimizer=OPTIM, clip_grad=CLIP, activation_dtype=torch.float64,
                              text_layout=text)
        steps = data_of(data)
        encoded, received = count_encoded_images(model), count_received_rows(trainer)
        results = [trainer.train_step(batch) for batch in steps]
        out.append({"losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
                    "params": full_params(model), "encoded": encoded[0], "received": received[0]})
    return out


def count_received_rows(trainer: MimoTrainer) -> list[int]:
    """A counter of the embedding rows the image bridge hands this rank (`Bridge.receive`)."""
    count, bridge = [0], trainer.bridges["images"]
    receive = bridge.receive

    def counted(*args, **kwargs):
        rows, counts = receive(*args, **kwargs)
        count[0] += rows.shape[0]
        return rows, counts

    bridge.receive = counted
    return count


def count_encoded_images(model) -> list[int]:
    """A counter of the images this rank's image submodule encodes (each forward's items), [0] if it has none."""
    count = [0]
    if "images" in model.modality_submodules:
        def add(module, args):
            count[0] += args[0].shape[0]
        unwrap(model.modality_submodules["images"]).register_forward_pre_hook(add)
    return count


def references() -> dict[str, tuple]:
    """The one-process reference of each data set (the short one unpacked)."""
    model = provider(None, IMAGES).provide()
    losses, norms = train_one_process(model, short_batches())
    short = (losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()})
    return {"parity": cached_reference(IMAGES, False, False), "short": short}


def check_row(name: str, results: list[dict], reference: tuple) -> None:
    """Every rank's losses and norms within 1e-8 of the reference, its parameters too, and every parameter held."""
    ref_losses, ref_norms, ref_params = reference
    seen = set()
    for rank, res in enumerate(results):
        for what, got_all, want_all in (("loss", res["losses"], ref_losses), ("norm", res["norms"], ref_norms)):
            for s, (got, want) in enumerate(zip(got_all, want_all, strict=True)):
                rel = abs(got - want) / abs(want)
                assert rel <= 1e-8, f"{name}: rank {rank} step {s} {what} {got!r} != reference {want!r} ({rel:.1e})"
        assert_matches_reference(res["params"], ref_params, f"{name}: rank {rank} parameter")
        seen.update(res["params"])
    assert seen == set(ref_params), f"{name}: parameters nobody holds: {sorted(set(ref_params) - seen)}"


def test_context_parallel_layouts_train_like_one_process():
    """Every row of `ROWS` in one world of four ranks."""
    refs = references()
    extents = sample_extents(short_batches()[0].input_ids, short_batches()[0].labels, (256,))
    assert 0 < int(extents[extents > 0].min()) <= SHORT  # the short document is there
    per_rank = run_distributed(train_rows, 4, ROWS, timeout_s=400)
    for i, (name, *_, data) in enumerate(ROWS):
        check_row(name, [rank_rows[i] for rank_rows in per_rank], refs[data])
    # each image is encoded exactly once across the language's CP x DP ranks, each rank a share: colocated (images
    # DP4) and homogeneous (images CP2 x DP2, as the language model)
    images = sum(int(batch.modality_inputs["images"].items_per_sample.sum()) for batch in batches(IMAGES))
    for row in (0, [r[0] for r in ROWS].index("homogeneous-cp2-dp2")):
        encoded = [rank_rows[row]["encoded"] for rank_rows in per_rank]
        assert sum(encoded) == images and all(0 < n < images for n in encoded), (ROWS[row][0], encoded, images)
    # heterogeneous: each CP rank receives only the image rows its sequence chunks hold (ranks 2 and 3: CP 0 and 1)
    tokens = images * ViTConfig.tiny().tokens_per_image
    received = [rank_rows[3]["received"] for rank_rows in per_rank]
    assert received[:2] == [0, 0] and sum(received[2:]) == tokens and all(0 < n < tokens for n in received[2:])
    # colocated (CP2 x DP2, and CP4): the same, from the span's all-to-all: every row reaches exactly one CP rank
    for name in ("colocated-images-dp4-lm-cp2dp2", "colocated-images-dp4-lm-cp4"):
        received = [rank_rows[[r[0] for r in ROWS].index(name)]["received"] for rank_rows in per_rank]
        assert sum(received) == tokens and all(0 < n < tokens for n in received), (name, received, tokens)


# -- the split itself, on the host --------------------------------------------------------------------------
def test_split_gives_each_rank_a_head_and_a_tail_chunk_of_every_document():
    """A padded row of 8 over CP2: rank 0 chunks 0 and 3, rank 1 chunks 1 and 2; a packed row splits per document
    and pads a document shorter than 2·CP chunks (here 3 tokens over 4 chunks) with positions of its own."""
    assert [c.tolist() for c in split_columns(8, None, 2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    documents = torch.tensor([0] * 8 + [1] * 3)
    assert [c.tolist() for c in split_columns(11, documents, 2)] == [[0, 1, 6, 7, 8, PAD], [2, 3, 4, 5, 9, 10]]


def test_split_text_keeps_the_whole_sequences_positions_labels_and_embedding_rows():
    """Rank 1's chunks of a packed row: positions of the unsplit samples, padding unlabelled, and the rows of the
    image embeddings its chunks hold (the second and third image tokens of the row)."""
    ids = torch.tensor([[5, 9, 9, 6, 7, 8, 4, 9, 3, 2, 1]])
    text = LanguageText(ids, ids + 100, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]]),
                        torch.tensor([[0] * 8 + [1] * 3]))
    mine = split_text(text, 1, 2, special_ids=(9,))
    assert mine.input_ids.tolist() == [[9, 6, 7, 8, 2, 1]]
    assert mine.position_ids.tolist() == [[2, 3, 4, 5, 1, 2]]
    assert mine.labels.tolist() == [[109, 106, 107, 108, 102, 101]]
    assert mine.every_rank_rows[9][1].tolist() == [1]
    first = split_text(text, 0, 2, special_ids=(9,))
    assert first.labels.tolist() == [[105, 109, 104, 109, 103, IGNORE_INDEX]]
    assert first.every_rank_rows[9][0].tolist() == [0, 2]
    assert first.key_documents.tolist() == [[0, 0, 0, 0, 1, PAD, 0, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("cp", [2, 4])
def test_split_columns_cover_every_column_once(cp):
    """Every column of every document lands on exactly one rank, every rank holds as many positions."""
    documents = torch.tensor([0] * 13 + [1] * 1 + [2] * 30)
    columns = split_columns(44, documents, cp)
    assert len({c.numel() for c in columns}) == 1
    kept = torch.cat(columns)
    assert sorted(kept[kept != PAD].tolist()) == list(range(44))


# -- resuming across CP sizes ----------------------------------------------------------------------------------
COLOCATED_CP2 = {"images": {"data_parallel_size": 4}, "language": {**CP2, "data_parallel_size": 2}}
COLOCATED_CP1 = {"images": {"data_parallel_size": 4}, "language": {"data_parallel_size": 4}}


def resume_chain(rank: int, world_size: int, root: str) -> list[dict]:
    """CP2 trains steps 1-2 and saves; CP1 loads it, trains step 3 and saves; CP2 loads that and trains step 4.
    Each run's losses and the last run's parameters (the checkpoint test's `train`, in one world)."""
    out = []
    for layout, load, stop in ((COLOCATED_CP2, None, 2), (COLOCATED_CP1, 2, 3), (COLOCATED_CP2, 3, 4)):
        trainer, ckpt = checkpointing.build_trainer(layout, "ddp"), Checkpointer(root)
        if load is not None:
            ckpt.load(str(ckpt.path(load)), trainer)
        steps, losses = checkpointing.all_batches(), []
        while trainer.step_count < stop:
            losses.append(trainer.train_step(steps[trainer.step_count]).loss)
        ckpt.save(trainer.step_count, trainer, checkpointing.extra_at(trainer.step_count, layout))
        out.append({"losses": losses, "params": full_params(trainer.model)})
    return out


def test_resume_across_cp_sizes_is_exact(tmp_path):
    """CP2 -> CP1 -> CP2 through checkpoints trains the four steps of one uninterrupted single process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parity, "STEPS", checkpointing.STEPS)
        ref_losses, _, ref_params = parity.reference(IMAGES)
    per_rank = run_distributed(resume_chain, 4, str(tmp_path), timeout_s=300)
    for rank, runs in enumerate(per_rank):
        losses = [loss for run in runs for loss in run["losses"]]
        for s, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
            assert abs(got - want) <= 1e-8 * abs(want), f"rank {rank} step {s + 1} loss {got!r} != {want!r}"
        assert_matches_reference(runs[-1]["params"], ref_params, f"CP2 -> CP1 -> CP2: rank {rank} parameter")


# -- the decoder alone: M-RoPE positions and Qwen's attention under CP ---------------------------------------
QWEN_TINY = {"qkv_bias": True, "qk_norm": True, "mrope": MRopeLayout((4, 2, 2), interleaved=True)}


def qwen_texts() -> list[LanguageText]:
    """Two padded rows of 30 (not a multiple of 2·CP) and one packed row of samples of 13, 2 and 15 positions,
    each with 3-D M-RoPE positions (t, h, w: made up, not monotone, as an image's are not)."""
    generator = torch.Generator().manual_seed(7)
    padded = torch.randint(0, 256, (2, 30), generator=generator)
    packed = torch.randint(0, 256, (1, 30), generator=generator)
    documents = torch.tensor([[0] * 13 + [1] * 2 + [2] * 15])
    texts = []
    for ids, docs in ((padded, None), (packed, documents)):
        positions = torch.randint(0, 40, (3, *ids.shape), generator=generator)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, ::5] = IGNORE_INDEX
        texts.append(LanguageText(ids, labels, positions, docs))
    return texts


def decoder_gradients(rank: int, world_size: int) -> list[dict]:
    """Per text: the whole text's loss sum and gradients on one rank, and the CP sums of each rank's chunks'."""
    group = torch.distributed.group.WORLD
    out = []
    for text in qwen_texts():
        result = {}
        for name, rank_text in (("whole", text), ("cp", split_text(text, rank, world_size, group=group))):
            torch.manual_seed(0)
            model = Decoder(DecoderConfig.tiny(**QWEN_TINY)).double()
            loss, _ = model(input_ids=rank_text.input_ids, labels=rank_text.labels, **rank_text.model_kwargs())
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            if name == "cp":
                for g in [loss.detach(), *grads.values()]:
                    torch.distributed.all_reduce(g)
                loss = loss.detach()
            result[name] = (float(loss), grads)
        out.append(result)
    return out


def test_decoder_under_cp_has_the_whole_sequences_loss_and_gradients():
    """M-RoPE positions, q/k norms and biases, padding to 2·CP and packed documents (one of 2 positions): the CP
    ranks' summed loss and gradients are the whole text's, float64 to 1e-10."""
    for rank, texts in enumerate(run_distributed(decoder_gradients, 2)):
        for i, result in enumerate(texts):
            (want, want_grads), (got, got_grads) = result["whole"], result["cp"]
            assert abs(got - want) <= 1e-10 * abs(want), (rank, i, got, want)
            assert_matches_reference(got_grads, want_grads, f"rank {rank} text {i} gradient", rel=1e-10)


def test_fsdp_beside_tp_under_cp_is_one_line_before_any_work():
    """FSDP2 shards over one dp_cp mesh dim, which cannot sit beside TP's (torch flattens mesh dims privately only):
    refused by the one check `mimo validate` and the wrapper reach; DDP, or FSDP2 without TP, is accepted."""
    layout = MimoParallelismConfig.from_dict({"images": {"data_parallel_size": 4},
                                              "language": {**CP2, "tensor_model_parallel_size": 2,
                                                           "data_parallel_size": 1}}).finalize(4)
    fsdp = DistributedConfig(ModuleDistributedConfig("fsdp"))
    with pytest.raises(WrapError) as e:
        check_distributed(fsdp, layout.module_names, layout)
    assert str(e.value) == ("module 'language': data_parallel fsdp with context_parallel_size 2 and "
                            "tensor_model_parallel_size 2 is not supported; use data_parallel ddp, or TP 1")
    check_distributed(DistributedConfig(), layout.module_names, layout)
    no_tp = MimoParallelismConfig.from_dict(ROWS[0][1]).finalize(4)
    check_distributed(fsdp, no_tp.module_names, no_tp)


def gather_in_bf16(rank: int, world_size: int) -> dict[str, object]:
    """K and V crossing in bf16 (the dtype the core attends in under autocast) against gathering float32 and
    casting after: the same values and the same float32 gradients; and what the all-gather moved."""
    import torch.distributed as dist

    from mimo.context_parallel import gather_sequence

    moved = []
    all_gather = dist.all_gather

    def recording(parts, x, group=None):
        moved.append(x.dtype)
        return all_gather(parts, x, group=group)

    gen = torch.Generator().manual_seed(rank)
    k = torch.randn(2, 3, 8, 4, generator=gen, requires_grad=True)
    v = torch.randn(2, 3, 8, 4, generator=gen).bfloat16().requires_grad_()
    grad = torch.randn(2, 6, 8 * world_size, 4, generator=gen).bfloat16()  # each rank's own: sums round
    results = {}
    dist.all_gather = recording
    try:
        for name, dtype in (("cast after", None), ("bf16 on the wire", torch.bfloat16)):
            kv = gather_sequence(torch.cat([k, v.to(k.dtype)], dim=1), None, dtype)
            kv = kv.to(torch.bfloat16)  # what the core attends in
            k.grad = v.grad = None
            kv.backward(grad)
            results[name] = (kv.detach(), k.grad.clone(), v.grad.clone())
    finally:
        dist.all_gather = all_gather
    return {"moved": moved, "same": all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True)),
            "grad dtypes": (results["bf16 on the wire"][1].dtype, results["bf16 on the wire"][2].dtype)}


def test_keys_and_values_cross_in_the_attention_dtype_and_their_gradients_sum_in_float32():
    for out in run_distributed(gather_in_bf16, 2):
        assert out["moved"] == [torch.float32, torch.bfloat16]
        assert out["same"] and out["grad dtypes"] == (torch.float32, torch.bfloat16)
