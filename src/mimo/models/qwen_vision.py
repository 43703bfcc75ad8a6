"""Qwen2.5-VL's and Qwen3-VL's vision towers at native resolution, on packed patches.

Both take a call's patches packed, [N, C·T·P·P] (the processor's `pixel_values`: every image of every size back
to back, no padding) and `grid_thw` [n, 3], and return the merged tokens [N / merge², out_hidden] (each 2×2 block
of neighbouring patches merged into one token for the language model), plus Qwen3-VL's DeepStack features.
Attention is block-diagonal: per frame (full attention), or per window (Qwen2.5-VL's windowed layers, whose
sequence is reordered window by window first and put back after the merger), through `segment_attention`.

The shared stack: a linear patch embedding (transformers' Conv3d, whose kernel equals its stride, as one matmul
on the same weight), 2-D rotary inside every attention (rows on the first quarter-pairs of each head, columns on
the next), pre-norm blocks, the patch merger. They differ in:
- Qwen2.5-VL: 14-px patches, a bias-free patch embedding, RMSNorm, a SwiGLU MLP with biases, window attention
  except in `fullatt_block_indexes`, a merger with an RMSNorm before its MLP.
- Qwen3-VL: 16-px patches, a biased patch embedding plus a learned position table bilinearly interpolated to each
  image's grid, LayerNorm, a GELU MLP, full attention everywhere, and DeepStack: the outputs of the layers in
  `deepstack_visual_indexes` merged by mergers of their own (normed after the 2×2 shuffle) and returned too.
Parameter names are transformers' (`Qwen2_5_VisionTransformerPretrainedModel`, `Qwen3VLVisionModel`), so
Hugging Face weights load by name. No distributed code: `tp_plan()` names how tensor parallelism shards it.

A tower built for a `layer_range` is one pipeline stage (issue 29): blocks [start, end) under their global names
`blocks.N`, the patch embedding (and Qwen3-VL's position table) only on the stage from block 0, the merger only on the
one that ends the stack, each DeepStack merger beside its block. Every stage rebuilds the geometry from `grid_thw`, so
between stages travels one flat tensor (`stage_input_numel`): the hidden states [N, H] (Qwen2.5-VL's in its window
order, as its blocks run them), then the DeepStack features already merged on earlier stages [N / merge², out] each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from mimo.models.attention import compute_dtype
from mimo.models.encoder_block import ACTIVATIONS, EncoderStage, block_stack, stage_range
from mimo.models.fused_parallel import FusedColwiseParallel
from mimo.models.qwen_vision_geometry import VisionGeometry, vision_geometry
from mimo.models.rmsnorm import RMSNorm
from mimo.models.rotary import rotate_half
from mimo.models.segment_attention import segment_attention

NORM_EPS = 1e-6  # transformers hard-codes the towers' norm epsilon (not a config key)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QwenVisionConfig:
    """The shape both towers share (defaults: Qwen2.5-VL-7B's tower)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        """Refuse shapes the tower cannot build (uneven heads, a head too small for 2-D rotary, ...)."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} is not a multiple of 4, which the 2-D rotary needs")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if min(self.depth, self.patch_size, self.temporal_patch_size, self.spatial_merge_size) < 1:
            raise ValueError("depth, patch_size, temporal_patch_size and spatial_merge_size must be positive")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per packed patch: C · T · P · P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token (merge²)."""
        return self.spatial_merge_size**2

    @property
    def num_layers_built(self) -> int:
        """Blocks the tower runs (all `depth`): what encoder pipeline stages split."""
        return self.depth


@dataclass(frozen=True)
class Qwen25VisionConfig(QwenVisionConfig):
    """Qwen2.5-VL's tower: window attention of `window_size` pixels except in `fullatt_block_indexes`."""

    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)

    def __post_init__(self) -> None:
        """Also refuse full-attention layers outside the stack and windows smaller than one merged token."""
        super().__post_init__()
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside the {self.depth} layers")
        if self.window_tokens < 1:
            raise ValueError(f"window_size {self.window_size} is smaller than one merged token "
                             f"({self.patch_size * self.spatial_merge_size} px)")

    @property
    def window_tokens(self) -> int:
        """A window's side in merged tokens (transformers floors window_size / merge / patch)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def qwen25_vl_7b(cls) -> Qwen25VisionConfig:
        """Qwen2.5-VL-7B-Instruct's tower (3B's and 72B's differ only in out_hidden_size)."""
        return cls()

    @classmethod
    def tiny(cls) -> Qwen25VisionConfig:
        """CPU-test size: 2-px patches, width 32, 4 layers (one full), windows of 3×3 merged tokens."""
        return cls(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=24, patch_size=2,
                   window_size=12, fullatt_block_indexes=(2,))


@dataclass(frozen=True)
class Qwen3VisionConfig(QwenVisionConfig):
    """Qwen3-VL's tower: a learned position table of `num_position_embeddings` (a square grid), DeepStack."""

    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)

    def __post_init__(self) -> None:
        """Also refuse a non-square position table and DeepStack layers outside the stack or repeated."""
        super().__post_init__()
        if self.position_grid**2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square grid")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad or len(set(self.deepstack_visual_indexes)) != len(self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} must be distinct "
                             f"layers of the {self.depth}")

    @property
    def position_grid(self) -> int:
        """Side of the learned position grid."""
        return int(round(self.num_position_embeddings**0.5))

    @classmethod
    def qwen3_vl_8b(cls) -> Qwen3VisionConfig:
        """Qwen3-VL-8B-Instruct's tower."""
        return cls(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
                   hidden_act="gelu_pytorch_tanh", patch_size=16)

    @classmethod
    def tiny(cls) -> Qwen3VisionConfig:
        """CPU-test size: 2-px patches, width 32, 4 layers, a 5×5 position grid, DeepStack from layers 0 and 2."""
        return cls(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=24,
                   hidden_act="gelu_pytorch_tanh", patch_size=2, num_position_embeddings=25,
                   deepstack_visual_indexes=(2, 0))


@dataclass(frozen=True)
class VisionOutput:
    """A tower's output: merged tokens [N / merge², out_hidden] in packed order, and DeepStack's features (one
    such tensor per `deepstack_visual_indexes` entry, in layer order as transformers lists them: the k-th goes
    into decoder layer k; empty for Qwen2.5-VL)."""

    embeddings: torch.Tensor
    deepstack: tuple[torch.Tensor, ...] = ()


class JoinDeepStack(nn.Module):
    """A tower's `VisionOutput` as the one tensor a modality submodule hands on: the merged tokens, with each
    DeepStack feature concatenated along the width ([N, out·(1 + k)]; the decoder splits them again, see
    `DecoderConfig.deepstack_layers`). No parameters: the towers' mergers are their projection."""

    def forward(self, output: VisionOutput) -> torch.Tensor:
        """[N, out] or [N, out·(1 + k)]."""
        return torch.cat([output.embeddings, *output.deepstack], dim=-1) if output.deepstack else output.embeddings

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """Nothing to shard."""
        return {}


class PackedTower(EncoderStage, nn.Module):
    """What `ModalitySubmodule` asks of an encoder of packed items: tokens per item and the smallest item; and
    what a pipeline stage of one is (`layer_range`, the message between stages)."""

    config: QwenVisionConfig

    def carried_features(self) -> int:
        """DeepStack features merged on the stages before this one (they arrive with the hidden states)."""
        return 0

    def stage_input_numel(self, grid_thw: torch.Tensor) -> int:
        """Values a stage past the first receives for a call of `grid_thw`, flat: the hidden states [N, H], then
        each DeepStack feature merged before it [N / merge², out]."""
        c, patches = self.config, int(grid_thw.prod(dim=1).sum())
        return patches * c.hidden_size + self.carried_features() * (patches // c.merge_unit) * c.out_hidden_size

    def stage_geometry(self, inputs: torch.Tensor, grid_thw: torch.Tensor,
                       geometry: VisionGeometry | None) -> VisionGeometry:
        """The call's geometry on the inputs' device, the inputs checked: packed patches on the first stage, the
        message of `stage_input_numel` values on a later one."""
        if self.has_front:
            _check_patches(inputs, self.config)
            patches = inputs.shape[0]
        else:
            expected = self.stage_input_numel(grid_thw)
            if inputs.numel() != expected:
                raise ValueError(f"a tower stage from block {self.layer_range[0]} takes {expected} values for "
                                 f"grid_thw {grid_thw.tolist()} (the stage before's hidden states and DeepStack "
                                 f"features), got {tuple(inputs.shape)}")
            patches = int(grid_thw.prod(dim=1).sum())
        # the grids come on the CPU (the step's host metadata): the index tensors go where the inputs are
        return (geometry or self.geometry(grid_thw, patches)).to(inputs.device)

    def geometry(self, grid_thw: torch.Tensor, num_patches: int) -> VisionGeometry:
        """The call's positions and frames (each tower's own)."""
        raise NotImplementedError

    def tokens_of(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged tokens of each item [n]: its patches over merge² (on the CPU, from the grids)."""
        return grid_thw.prod(dim=1) // self.config.merge_unit

    @property
    def smallest_grid(self) -> torch.Tensor:
        """One frame of one merge block: the item a text-only micro-batch encodes (and drops)."""
        m = self.config.spatial_merge_size
        return torch.tensor([1, m, m])


# -- the shared pieces ---------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Packed patches [N, C·T·P·P] → [N, hidden]: transformers' Conv3d (kernel = stride) as one matmul."""

    def __init__(self, config: QwenVisionConfig, bias: bool) -> None:
        """Build the Conv3d whose weight [hidden, C, T, P, P] holds the projection (Hugging Face's shape)."""
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """One matmul per patch with the flattened kernel."""
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1), self.proj.bias)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] of the 2-D rotary: head_dim/4 frequencies for rows, as many for columns, twice."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=positions.device) / spatial))
    angles = (positions[..., None].float() * inv_freq).flatten(1)  # [N, 2 · head_dim/4]: rows then columns
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, d] by the tables [N, d] in at least float32, back in x's dtype."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = cos[:, None].to(wide.dtype), sin[:, None].to(wide.dtype)
    return (wide * cos + rotate_half(wide) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional attention with a fused biased q|k|v projection and 2-D rotary; heads follow the local width."""

    def __init__(self, config: QwenVisionConfig) -> None:
        """Build `qkv` (H → 3H) and `proj` (H → H), both biased."""
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """[N, H] → [N, H]; `attend` holds which patches see which (per frame or per window)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).unbind(1)  # each [N, heads, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(*(t.transpose(0, 1)[None] for t in (q, k, v)))  # [1, heads, N, d]
        return self.proj(out[0].transpose(0, 1).flatten(1))


class SwiGLUMLP(nn.Module):
    """Qwen2.5-VL's MLP: down(act(gate(x)) · up(x)), all three biased."""

    def __init__(self, config: QwenVisionConfig) -> None:
        """Build gate/up (H → F) and down (F → H)."""
        super().__init__()
        self.activation = config.hidden_act
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gated feed-forward: [N, H] → [N, H]."""
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class GELUMLP(nn.Module):
    """Qwen3-VL's MLP: fc2(act(fc1(x))), both biased."""

    def __init__(self, config: QwenVisionConfig) -> None:
        """Build fc1 (H → F) and fc2 (F → H)."""
        super().__init__()
        self.activation = config.hidden_act
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise feed-forward: [N, H] → [N, H]."""
        return self.linear_fc2(ACTIVATIONS[self.activation](self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: QwenVisionConfig, qwen3: bool) -> None:
        """Qwen3-VL: LayerNorms and the GELU MLP; Qwen2.5-VL: RMSNorms and SwiGLU."""
        super().__init__()
        norm = (lambda: nn.LayerNorm(config.hidden_size, eps=NORM_EPS)) if qwen3 else (
            lambda: RMSNorm(config.hidden_size, eps=NORM_EPS))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(config)
        self.mlp = GELUMLP(config) if qwen3 else SwiGLUMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """One layer: [N, H] → [N, H]."""
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


def block_tp_plan(prefix: str, qwen3: bool) -> dict[str, ParallelStyle]:
    """One block's TP: q|k|v column-sharded with each rank keeping its heads of every part (`FusedColwiseParallel`:
    an all-gather, since HF's fused layout is not split by heads), proj row-sharded; the MLP Megatron-style."""
    mlp = ({"mlp.linear_fc1": ColwiseParallel(), "mlp.linear_fc2": RowwiseParallel()} if qwen3 else
           {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    plan = {"attn.qkv": FusedColwiseParallel(3), "attn.proj": RowwiseParallel(), **mlp}
    return {f"{prefix}{k}": v for k, v in plan.items()}


# -- Qwen2.5-VL ----------------------------------------------------------------------------------------------
class Qwen25Merger(nn.Module):
    """RMSNorm each patch, concatenate merge² neighbours, then Linear → GELU → Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, config: QwenVisionConfig) -> None:
        """Build `ln_q` and the two-layer MLP (merge²·H → merge²·H → out)."""
        super().__init__()
        width = config.hidden_size * config.merge_unit
        self.ln_q = RMSNorm(config.hidden_size, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H] → [N / merge², out]."""
        normed = self.ln_q(x)
        return self.mlp(normed.reshape(-1, self.mlp[0].in_features))


class Qwen25VisionTower(PackedTower):
    """Qwen2.5-VL's vision tower: packed patches + grid_thw → merged tokens (`VisionOutput`, no DeepStack)."""

    def __init__(self, config: Qwen25VisionConfig, layer_range: tuple[int, int] | None = None) -> None:
        """Build patch embedding, blocks and merger under Hugging Face's names; with `layer_range`, one pipeline
        stage: those blocks, the patch embedding only from block 0, the merger only at the end."""
        super().__init__()
        self.config = config
        self.num_blocks = config.depth
        self.layer_range = stage_range(layer_range, self.num_blocks)
        if self.has_front:
            self.patch_embed = PatchEmbed(config, bias=False)
        self.blocks = block_stack(self.layer_range, lambda: VisionBlock(config, qwen3=False))
        if self.has_end:
            self.merger = Qwen25Merger(config)

    def geometry(self, grid_thw: torch.Tensor, num_patches: int) -> VisionGeometry:
        """The call's positions, frames and windows (may be built ahead, outside a compiled region)."""
        c = self.config
        return vision_geometry(grid_thw, c.spatial_merge_size, num_patches, window_tokens=c.window_tokens)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                geometry: VisionGeometry | None = None) -> VisionOutput | torch.Tensor:
        """Embed, reorder window by window, run the blocks (full or windowed), merge, restore packed order. A stage
        past the first takes the stage before's hidden states (flat, in window order) as `pixel_values`; one before
        the last returns its own so."""
        c = self.config
        geometry = self.stage_geometry(pixel_values, grid_thw, geometry)
        order = geometry.window_order
        if order is None:
            raise ValueError("Qwen2.5-VL's tower needs a geometry with its windows: build it with tower.geometry()")
        x = self.patch_embed(pixel_values)[order] if self.has_front else pixel_values.view(-1, c.hidden_size)
        cos, sin = rotary_tables(geometry.positions[order], c.head_dim, c.rope_theta)
        full = segment_attention(geometry.frame_lengths, x.device, compute_dtype(x))
        windowed = segment_attention(geometry.window_lengths, x.device, compute_dtype(x))
        for i, block in self.blocks.items():
            x = block(x, cos, sin, full if int(i) in c.fullatt_block_indexes else windowed)
        if not self.has_end:
            return x.flatten()
        return VisionOutput(self.merger(x)[geometry.merged_inverse])

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """Every block's attention (by heads) and MLP sharded, and the merger's MLP; embeddings and norms replicated."""
        plan: dict[str, ParallelStyle] = {}
        if self.has_end:
            plan.update({"merger.mlp.0": ColwiseParallel(), "merger.mlp.2": RowwiseParallel()})
        for i in self.blocks:
            plan.update(block_tp_plan(f"blocks.{i}.", qwen3=False))
        return plan


# -- Qwen3-VL ------------------------------------------------------------------------------------------------
class Qwen3Merger(nn.Module):
    """LayerNorm (per patch, or after concatenating merge² neighbours: `postshuffle`), then fc1 → GELU → fc2."""

    def __init__(self, config: QwenVisionConfig, postshuffle: bool) -> None:
        """Build `norm`, `linear_fc1` (merge²·H → merge²·H) and `linear_fc2` (→ out)."""
        super().__init__()
        width = config.hidden_size * config.merge_unit
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(width if postshuffle else config.hidden_size, eps=NORM_EPS)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H] → [N / merge², out]."""
        width = self.linear_fc1.in_features
        x = self.norm(x.reshape(-1, width)) if self.postshuffle else self.norm(x).reshape(-1, width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def interpolation_taps(positions: torch.Tensor, sizes: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps into a side×side table for patches at `positions` of frames `sizes`:
    indices, weights [N, 4] (transformers' `get_vision_interpolation_indices_and_weights`)."""
    src = positions.float() * (side - 1) / (sizes - 1).clamp(min=1).float()  # [N, 2]: row, column on the table
    floor = src.floor()
    frac = src - floor
    low = floor.long().clamp(0, side - 1)
    high = (low + 1).clamp(max=side - 1)
    (r0, c0), (r1, c1) = low.unbind(-1), high.unbind(-1)
    fr, fc = frac.unbind(-1)
    indices = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], dim=-1)
    weights = torch.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], dim=-1)
    return indices, weights


class Qwen3VisionTower(PackedTower):
    """Qwen3-VL's vision tower: packed patches + grid_thw → merged tokens and DeepStack features (`VisionOutput`)."""

    def __init__(self, config: Qwen3VisionConfig, layer_range: tuple[int, int] | None = None) -> None:
        """Build patch embedding, position table, blocks, merger and the DeepStack mergers under HF's names; with
        `layer_range`, one pipeline stage: those blocks and the DeepStack mergers of their layers, the embedding
        and position table only from block 0, the merger only at the end."""
        super().__init__()
        self.config = config
        self.num_blocks = config.depth
        self.layer_range = stage_range(layer_range, self.num_blocks)
        if self.has_front:
            self.patch_embed = PatchEmbed(config, bias=True)
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = block_stack(self.layer_range, lambda: VisionBlock(config, qwen3=True))
        if self.has_end:
            self.merger = Qwen3Merger(config, postshuffle=False)
        start, end = self.layer_range
        self.deepstack_merger_list = nn.ModuleDict({  # merger j beside its layer indexes[j]
            str(j): Qwen3Merger(config, postshuffle=True)
            for j, layer in enumerate(config.deepstack_visual_indexes) if start <= layer < end})

    def carried_features(self) -> int:
        """DeepStack's features of layers before this stage (merged there)."""
        return sum(layer < self.layer_range[0] for layer in self.config.deepstack_visual_indexes)

    def geometry(self, grid_thw: torch.Tensor, num_patches: int) -> VisionGeometry:
        """The call's positions and frames (may be built ahead, outside a compiled region)."""
        return vision_geometry(grid_thw, self.config.spatial_merge_size, num_patches)

    def positions(self, geometry: VisionGeometry) -> torch.Tensor:
        """The learned position table resampled to each patch's place in its frame: [N, H]."""
        indices, weights = interpolation_taps(geometry.positions, geometry.sizes, self.config.position_grid)
        return F.embedding_bag(indices, self.pos_embed.weight, per_sample_weights=weights.to(self.pos_embed.weight),
                               mode="sum")

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                geometry: VisionGeometry | None = None) -> VisionOutput | torch.Tensor:
        """Embed, add positions, run the blocks (full attention per frame), merge; DeepStack on the way. A stage
        past the first takes the stage before's message (`stage_input_numel`) as `pixel_values`; one before the
        last returns its own: hidden states and every DeepStack feature merged so far, flat."""
        c = self.config
        geometry = self.stage_geometry(pixel_values, grid_thw, geometry)
        if self.has_front:
            x = self.patch_embed(pixel_values)
            x, deepstack = x + self.positions(geometry).to(x.dtype), []
        else:
            x, deepstack = self._unpack(pixel_values, geometry.num_patches)
        cos, sin = rotary_tables(geometry.positions, c.head_dim, c.rope_theta)
        attend = segment_attention(geometry.frame_lengths, x.device, compute_dtype(x))
        for i, block in self.blocks.items():
            x = block(x, cos, sin, attend)
            if int(i) in c.deepstack_visual_indexes:  # merger j belongs to layer indexes[j]; features in layer order
                deepstack.append(self.deepstack_merger_list[str(c.deepstack_visual_indexes.index(int(i)))](x))
        if not self.has_end:
            return torch.cat([x.flatten(), *(f.flatten() for f in deepstack)])
        return VisionOutput(self.merger(x), tuple(deepstack))

    def _unpack(self, message: torch.Tensor, patches: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage before's flat message → hidden states [N, H] and its DeepStack features [N / merge², out]."""
        c = self.config
        sizes = [patches * c.hidden_size] + [patches // c.merge_unit * c.out_hidden_size] * self.carried_features()
        hidden, *features = message.split(sizes)
        return hidden.view(patches, c.hidden_size), [f.view(-1, c.out_hidden_size) for f in features]

    def tp_plan(self) -> dict[str, ParallelStyle]:
        """Every block's attention (by heads) and MLP sharded, and every merger's MLP; the rest replicated."""
        plan: dict[str, ParallelStyle] = {}
        mergers = [*(["merger"] if self.has_end else []), *(f"deepstack_merger_list.{j}"
                                                             for j in self.deepstack_merger_list)]
        for name in mergers:
            plan.update({f"{name}.linear_fc1": ColwiseParallel(), f"{name}.linear_fc2": RowwiseParallel()})
        for i in self.blocks:
            plan.update(block_tp_plan(f"blocks.{i}.", qwen3=True))
        return plan


def _check_patches(pixel_values: torch.Tensor, config: QwenVisionConfig) -> None:
    """Refuse pixel_values that are not packed patches [N, C·T·P·P] of this tower."""
    if pixel_values.dim() != 2 or pixel_values.shape[-1] != config.patch_dim:
        raise ValueError(f"pixel_values must be packed patches [N, {config.patch_dim}] (C·T·P·P = "
                         f"{config.in_channels}·{config.temporal_patch_size}·{config.patch_size}²), got "
                         f"{tuple(pixel_values.shape)}")
