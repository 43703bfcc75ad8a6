"""Wrapping beyond the language model: encoder + projector (TP, DP), LLaVA stage 1 (frozen LM), bf16.

Parity tests run in float64 against the single-process model the same provider builds with
`mimo_parallelism_config=None`, to a relative 1e-8. The images and language modules share one layout
(homogeneous), so a rank's embeddings go straight into its own language model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

from mimo.config import MimoParallelismConfig
from mimo.data import MimoBatch, ModalitySpec, SyntheticDataset
from mimo.ddp_shards import full_tensor, sharding
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, unwrap
from mimo.families.llava import LlavaMimoProvider
from mimo.models import DecoderConfig, MimoModel, ViTConfig
from mimo.testing import assert_matches_reference, run_distributed
from tests.test_distributed import full_state

IMAGES = "images"
IMAGE_ID = DecoderConfig.tiny().vocab_size  # LLaVA's default image token id: the first id past the vocabulary
TOKENS, HIDDEN = ViTConfig.tiny().tokens_per_image, DecoderConfig.tiny().hidden_size  # per image; language width
TP2, DP2 = {"tensor_model_parallel_size": 2}, {"data_parallel_size": 2}
SEED = 5
BF16_STEPS, BF16_LR = 8, 3e-3


def llava(layout: dict | None, dtype: torch.dtype = torch.float64, **kwargs) -> LlavaMimoProvider:
    """The tiny LLaVA with images and language on one layout (None: the single-process reference)."""
    config = None if layout is None else MimoParallelismConfig.from_dict({IMAGES: layout, "language": layout})
    return LlavaMimoProvider.preset("tiny", mimo_parallelism_config=config, params_dtype=dtype, seed=SEED, **kwargs)


def fixed_batch(dtype: torch.dtype = torch.float64) -> MimoBatch:
    """4 samples with 3, 1, 0, 1 images: DP replica 0 of 2 gets 4 images, replica 1 gets 1."""
    batch = SyntheticDataset(4, {IMAGES: ModalitySpec.image(IMAGE_ID, TOKENS)}, seed=0, dtype=dtype).batch(range(4))
    assert batch.modality_inputs[IMAGES].items_per_sample.tolist() == [3, 1, 0, 1]
    return batch


def upstream_grad(batch: MimoBatch) -> torch.Tensor:
    """A fixed gradient for every projected image token of the global batch, [tokens, language hidden]."""
    tokens = int(batch.modality_inputs[IMAGES].items_per_sample.sum()) * TOKENS
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def token_rows(batch: MimoBatch, d: int, dp: int) -> slice:
    """The rows of the global image-token embeddings that DP replica d of `dp` produces."""
    counts = batch.modality_inputs[IMAGES].items_per_sample
    n = batch.num_samples // dp
    first, last = int(counts[: d * n].sum()), int(counts[: (d + 1) * n].sum())
    return slice(first * TOKENS, last * TOKENS)


def dp_coord(provider: LlavaMimoProvider) -> tuple[int, int]:
    """(DP rank, DP size) of this rank's images module."""
    grid = provider.build_infra().module_to_grid_map[IMAGES]
    return grid.coord.dp, grid.size("dp")


def language_loss_sum(model: MimoModel, batch: MimoBatch) -> torch.Tensor:
    """encode → language_inputs → one language-model call with labels: the summed cross-entropy."""
    embeddings = model.encode(batch.modality_inputs)
    # MimoModel.tokens_per_sample reads `.tokens_per_item` off the (possibly DDP-wrapped) submodule
    tokens = {n: b.items_per_sample * unwrap(model.modality_submodules[n]).tokens_per_item
              for n, b in batch.modality_inputs.items()}
    inputs = model.language_inputs(batch.input_ids, embeddings, tokens)
    loss_sum, _ = model.language_model(**inputs, labels=model.language_labels(batch.input_ids, batch.labels))
    return loss_sum


def worst_difference(results: list[dict], ref: dict[str, torch.Tensor]) -> float:
    """Every rank's gradients match the reference's (same names); the largest relative difference."""
    worst = 0.0
    for rank, grads in enumerate(results):
        assert sorted(grads) == sorted(ref), f"rank {rank}"
        worst = max(worst, assert_matches_reference(grads, ref, f"rank {rank} grad"))
    return worst


# -- a. encoder + projector alone ----------------------------------------------------------------------
def encoder_grads(rank: int, world_size: int, layout: dict | None) -> dict[str, torch.Tensor]:
    """Run the images module on this replica's items, backprop the replica's rows of the fixed gradient."""
    provider = llava(layout, freeze_language_model=True)
    model = provider.provide() if layout is None else provider.provide_distributed_model()
    d, dp = (0, 1) if layout is None else dp_coord(provider)
    if layout is not None:  # the layout really applies: DDP where DP > 1, TP shards where TP > 1
        images = model.modality_submodules[IMAGES]
        grid = provider.build_infra().module_to_grid_map[IMAGES]
        assert isinstance(images, DDP) == (grid.size("dp") > 1)
        assert any(sharding(p) for p in images.parameters()) == (grid.size("tp") > 1)
    batch = fixed_batch()
    out = model.encode(batch.shard(d, dp).modality_inputs)[IMAGES]
    out.backward(upstream_grad(batch)[token_rows(batch, d, dp)])
    return full_state(model.modality_submodules[IMAGES], grads=True)


@pytest.mark.parametrize("layout", [TP2, DP2], ids=["tp2", "dp2"])
def test_encoder_and_projector_parity(layout):
    ref = encoder_grads(0, 1, None)
    worst = worst_difference(run_distributed(encoder_grads, 2, layout), ref)
    print(f"\nencoder+projector {layout}: largest relative difference {worst:.1e}")


# -- b. LLaVA stage 1: frozen encoder and language model, trained projector ------------------------------
def stage1_grads(rank: int, world_size: int, lm_kind: str | None) -> dict[str, torch.Tensor | None]:
    """One backward of the global per-token mean loss; every parameter's full gradient (None if it has none)."""
    provider = llava(None if lm_kind is None else DP2, freeze_language_model=True, freeze_vision_encoder=True)
    if lm_kind is None:
        model, (d, dp) = provider.provide(), (0, 1)
    else:
        config = DistributedConfig(modules={"language": ModuleDistributedConfig(lm_kind)})
        model, (d, dp) = provider.provide_distributed_model(config), dp_coord(provider)
        assert isinstance(model.modality_submodules[IMAGES], DDP)
        assert not isinstance(model.language_model, DDP)  # frozen: never DDP-wrapped
        assert isinstance(model.language_model, FSDPModule) == (lm_kind == "fsdp")
    batch = fixed_batch()
    loss_sum = language_loss_sum(model, batch.shard(d, dp))
    (loss_sum / batch.num_label_tokens(model.special_token_ids)).backward()
    return {f"{part}.{name}": None if p.grad is None else full_tensor(p.grad, p).clone()
            for part, module in (("images", model.modality_submodules[IMAGES]), ("language", model.language_model))
            for name, p in unwrap(module).named_parameters()}


@pytest.fixture(scope="module")
def stage1_ref() -> dict[str, torch.Tensor | None]:
    return stage1_grads(0, 1, None)


@pytest.mark.parametrize("lm_kind", ["ddp", "fsdp"])
def test_frozen_language_model_trains_projector(stage1_ref, lm_kind):
    trained = {n: g for n, g in stage1_ref.items() if g is not None}
    assert sorted(trained) == sorted(n for n in stage1_ref if n.startswith("images.projection."))
    results = run_distributed(stage1_grads, 2, lm_kind)
    frozen = sorted(n for n in stage1_ref if n not in trained)
    for rank, grads in enumerate(results):
        assert sorted(n for n, g in grads.items() if g is None) == frozen, f"rank {rank}: only frozen params lack grads"
    worst = worst_difference([{n: g for n, g in r.items() if g is not None} for r in results], trained)
    print(f"\nstage 1, language {lm_kind}: largest relative difference {worst:.1e}")


# -- c. bf16 smoke ------------------------------------------------------------------------------------
def bf16_losses(rank: int, world_size: int, kind: str) -> list[float]:
    """BF16_STEPS AdamW steps on one fixed batch, both modules computing in bfloat16; the global losses."""
    provider = llava(DP2, dtype=torch.float32)
    model = provider.provide_distributed_model(DistributedConfig(ModuleDistributedConfig(kind, torch.bfloat16)))
    d, dp = dp_coord(provider)
    batch = fixed_batch(torch.float32)
    mine, tokens = batch.shard(d, dp), batch.num_label_tokens(model.special_token_ids)
    assert model.encode(mine.modality_inputs)[IMAGES].dtype == torch.bfloat16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=BF16_LR)
    losses = []
    for _ in range(BF16_STEPS):
        loss_sum = language_loss_sum(model, mine)
        (loss_sum / tokens).backward()
        total = loss_sum.detach().float()
        dist.all_reduce(total)
        losses.append(float(total) / tokens)
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_bf16_training_smoke(kind):
    losses = run_distributed(bf16_losses, 2, kind)[0]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    print(f"\nbf16 {kind}: losses {[round(x, 3) for x in losses]}")
