"""Tensor-parallel plans on 2 gloo ranks: shards equal slices of the full model, losses and grads match.

Each module is built on the meta device, parallelized with its own `tp_plan()` and initialized with
`init_parameters`; the reference is the same module built whole on CPU with the same seed. Matching
losses prove the plans and the `unflatten(-1, (-1, head_dim))` reshapes are right.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from mimo.models import (
    AudioConfig,
    AudioEncoder,
    Decoder,
    DecoderConfig,
    MimoModel,
    ModalityBatch,
    ViTConfig,
    ViTEncoder,
    init_parameters,
)
from mimo.models.rotary import MRopeLayout
from mimo.testing import run_distributed
from tests.models.qwen_towers_tp import qwen_towers_tp_problems
from tests.models.tiny import tiny_llava

SEED = 3
IMAGE_ID = 500


def _local_slice(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """What this rank should hold of `full`, derived by hand from the parameter's placement."""
    if not isinstance(param, DTensor):
        return full
    (placement,) = param.placements
    if isinstance(placement, Replicate):
        return full
    assert isinstance(placement, Shard), placement
    return full.chunk(world, dim=placement.dim)[rank]


def _local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` laid out as `like` (a vocab-sharded embedding's grad comes out Replicate)."""
    if not isinstance(t, DTensor):
        return t
    return t.redistribute(like.device_mesh, like.placements).to_local()


def _assert_matches(full: torch.nn.Module, sharded: torch.nn.Module, rank: int, world: int, grads: bool) -> None:
    """Every sharded parameter (and, if asked, its gradient) equals its slice of the full one."""
    reference = dict(full.named_parameters())
    for name, param in sharded.named_parameters():
        expected = _local_slice(reference[name].detach(), param, rank, world)
        assert torch.equal(_local(param.detach(), param), expected), f"rank {rank}: value of {name}"
        if grads:
            expected = _local_slice(reference[name].grad, param, rank, world)
            torch.testing.assert_close(_local(param.grad, param), expected, rtol=1e-8, atol=1e-14,
                                       msg=lambda m, n=name: f"rank {rank}: grad of {n}: {m}")


def _sharded(build, rank: int, world: int, sequence_parallel: bool = False) -> torch.nn.Module:  # noqa: ANN001
    """Build (a zero-arg builder) on meta in float64, apply the module's TP plan over all ranks, then init."""
    with torch.device("meta"):
        module = build().double()
    parallelize_module(module, init_device_mesh("cpu", (world,)), module.tp_plan(sequence_parallel=sequence_parallel))
    init_parameters(module, SEED)
    return module


def _reference(build) -> torch.nn.Module:  # noqa: ANN001 - a zero-arg builder
    """The same module whole on CPU in float64, same seed."""
    module = build().double()
    init_parameters(module, SEED)
    return module


QWEN = {"kv_channels": 12, "qkv_bias": True, "qk_norm": True, "mrope": MRopeLayout((2, 2, 2), interleaved=True)}


def _decoder_worker(rank: int, world: int, tie: bool, sequence_parallel: bool = False, seq: int = 12,
                    qwen: bool = False) -> float:
    """Decoder: shard values, loss (rel 1e-8) and gradients against the full model. `qwen`: q/k head norms
    (replicated weights whose gradients are summed over TP), explicit head_dim and M-RoPE on 3-D positions."""
    cfg = DecoderConfig.tiny(tie_embeddings=tie, **(QWEN if qwen else {}))
    full, tp = _reference(lambda: Decoder(cfg)), _sharded(lambda: Decoder(cfg), rank, world, sequence_parallel)
    assert isinstance(tp.layers["0"].self_attn.k_proj.weight, DTensor)
    if qwen:
        assert tp.layers["0"].self_attn.q_norm.weight.placements == (Replicate(),)
    if tie:
        assert tp.lm_head.weight is tp.embed_tokens.weight
    _assert_matches(full, tp, rank, world, grads=False)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    results = []
    # 3-D positions: text 0-2, a 2×3-token image at 3 (h 3-4, w 3-5), text again from 6
    grid = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(2), torch.arange(3), indexing="ij")).flatten(1)
    positions = torch.cat([torch.arange(3).expand(3, -1), grid + 3, torch.arange(6, seq).expand(3, -1)], dim=1)
    kwargs = {"position_ids": positions[:, None, :seq].expand(-1, 2, -1)} if qwen else {}
    added = []  # DeepStack: row 1's image rows added after layer 0 (under SP: into the sequence-sharded residual,
    # positions 3-8 of 13 in both ranks' shares) and after layer 1 (the stack's gathered output)
    for _ in (full, tp):
        rows = torch.randn(2, 6, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        added.append(rows.requires_grad_())
    where = torch.arange(3, 9) + seq
    for model, rows in zip((full, tp), added, strict=True):
        extra = {"added_after_layer": {0: (where, rows[0]), 1: (where, rows[1])}} if qwen else {}
        loss_sum, count = model.loss(model(model.embed(ids), **kwargs, **extra), labels)
        (loss_sum / count).backward()
        results.append(loss_sum.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-8, atol=0)
    _assert_matches(full, tp, rank, world, grads=True)
    if qwen:  # every TP rank holds the rows' whole gradient (the bridge sends TP rank 0's)
        torch.testing.assert_close(added[1].grad, added[0].grad, rtol=1e-8, atol=1e-14)
    return float(results[1])


def _qwen_decoder_worker(rank: int, world: int) -> list[float]:
    """The Qwen-shaped decoder, tied, 13 tokens, DeepStack additions after both layers: TP, then TP with sequence
    parallelism, in one process spawn."""
    return [_decoder_worker(rank, world, True, sequence_parallel, 13, True) for sequence_parallel in (False, True)]


def _encoder_worker(rank: int, world: int, sequence_parallel: bool = False) -> None:
    """ViT and audio encoders: shard values, features and gradients against the full encoders."""
    gen = torch.Generator().manual_seed(0)
    cases = [
        (lambda: ViTEncoder(ViTConfig.tiny()), torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=gen)),
        (lambda: AudioEncoder(AudioConfig.tiny()), torch.randn(2, 16, 16, dtype=torch.float64, generator=gen)),
    ]
    for build, items in cases:
        full, tp = _reference(build), _sharded(build, rank, world, sequence_parallel)
        outs = [model(items) for model in (full, tp)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-8, atol=1e-14)
        weights = torch.randn_like(outs[0])
        for out in outs:
            (out * weights).sum().backward()
        _assert_matches(full, tp, rank, world, grads=True)
    if not sequence_parallel:  # Qwen-VL's packed towers: their plans take no sequence_parallel
        assert qwen_towers_tp_problems(rank, world) == []


def _llava(rank: int | None = None, world: int | None = None) -> MimoModel:
    """A tiny LLaVA-like MimoModel; with a rank, every part is TP-sharded over the world from meta."""
    if rank is None:
        model = tiny_llava(IMAGE_ID).double()
        init_parameters(model, SEED)
        return model
    with torch.device("meta"):
        model = tiny_llava(IMAGE_ID).double()
    mesh = init_device_mesh("cpu", (world,))
    images = model.modality_submodules["images"]
    parallelize_module(model.language_model, mesh, model.language_model.tp_plan())
    parallelize_module(images, mesh, images.tp_plan())
    init_parameters(model, SEED)
    return model


def _llava_worker(rank: int, world: int) -> None:
    """The whole MimoModel with every part TP-sharded gives the reference loss and gradients."""
    full, tp = _llava(), _llava(rank, world)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 40), generator=gen)
    ids[1, 4:36] = IMAGE_ID  # sample 0 has no image, sample 1 has two
    labels = torch.roll(ids, -1, 1)
    images = {"images": ModalityBatch(torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen),
                                      torch.tensor([0, 2]))}
    losses = []
    for model in (full, tp):
        loss_sum, count = model(ids, labels, images)
        (loss_sum / count).backward()
        losses.append(loss_sum.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-8, atol=0)
    _assert_matches(full, tp, rank, world, grads=True)


def test_decoder_tensor_parallel_matches_full_model() -> None:
    """Untied and tied embeddings, world 2: both ranks see the same loss as the full model."""
    for tie in (False, True):
        losses = run_distributed(_decoder_worker, 2, tie)
        assert losses[0] == losses[1]


def test_encoders_tensor_parallel_match_full_encoders() -> None:
    """ViT tiny, audio tiny and the Qwen-VL towers (tests/models/qwen_towers_tp.py), world 2."""
    run_distributed(_encoder_worker, 2)


def test_llava_all_parts_tensor_parallel_matches_reference() -> None:
    """ViT + projector + decoder all sharded over 2 ranks, through MimoModel.forward."""
    run_distributed(_llava_worker, 2)


def test_decoder_sequence_parallel_matches_full_model() -> None:
    """Sequence-parallel norms, 13 tokens over 2 ranks (7 + 6: DTensor's uneven shards), untied and tied."""
    for tie in (False, True):
        losses = run_distributed(_decoder_worker, 2, tie, True, 13)
        assert losses[0] == losses[1]


def test_qwen_decoder_tensor_and_sequence_parallel_match_full_model() -> None:
    """Qwen shapes (q/k norms, head_dim 12, biases, interleaved M-RoPE on 3-D positions), tied, DeepStack additions,
    TP2 and TP2 with sequence parallelism: 13 tokens, the image's positions in both ranks' shares."""
    losses = run_distributed(_qwen_decoder_worker, 2)
    assert losses[0] == losses[1]


def test_encoders_sequence_parallel_match_full_encoders() -> None:
    """ViT tiny (17 tokens with the class token: 9 + 8) and audio tiny, sequence-parallel over 2 ranks."""
    run_distributed(_encoder_worker, 2, True)
