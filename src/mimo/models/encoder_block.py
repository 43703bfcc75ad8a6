"""The pre-norm transformer block shared by the built-in encoders (ViT, audio): CLIP's encoder layer.

Bidirectional self-attention with biased q/k/v/out projections and a two-layer MLP, each behind a
LayerNorm and a residual. Parameter names follow Hugging Face's CLIP (`self_attn.q_proj`, `layer_norm1`,
`mlp.fc1`, ...) so pretrained CLIP weights load by name. No distributed code: tensor parallelism is
applied from outside with `encoder_block_tp_plan` / `encoder_stack_tp_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from mimo.models.sequence_parallel import gathered_input, scattered_output, sharded_norm, stack_boundaries


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU, x·σ(1.702x): what OpenAI's CLIP ViT-L/14 was trained with."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (SigLIP's `gelu_pytorch_tanh`)."""
    return F.gelu(x, approximate="tanh")


# Keys are Hugging Face's `hidden_act` / `projector_hidden_act` names, so a config's value looks up directly.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh, "silu": F.silu,
               "relu": F.relu}


class EncoderSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; heads are inferred from the (possibly sharded) width."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        """Build q/k/v/out projections with biases; `hidden_size` must divide into `num_heads` heads."""
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, h·d] → [B, h, S, d]; h (-1) is whatever this rank holds: all heads, or its TP shard of them."""
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend every token to every token of its item: [B, S, H] → [B, S, H]."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderMLP(nn.Module):
    """fc1 → activation → fc2, both with biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str) -> None:
        """Build the two projections; `activation` is a key of `ACTIVATIONS`."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise feed-forward: [B, S, H] → [B, S, H]."""
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(
        self, hidden_size: int, num_heads: int, ffn_hidden_size: int, layer_norm_eps: float, activation: str
    ) -> None:
        """Build the two norms, the attention and the MLP."""
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.self_attn = EncoderSelfAttention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = EncoderMLP(hidden_size, ffn_hidden_size, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One encoder layer: [B, S, H] → [B, S, H]."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def encoder_block_params(hidden_size: int, ffn_hidden_size: int) -> int:
    """Closed-form parameter count of one `EncoderBlock` (4 biased H×H, 2 biased MLP linears, 2 LNs)."""
    attention = 4 * (hidden_size * hidden_size + hidden_size)
    mlp = 2 * hidden_size * ffn_hidden_size + ffn_hidden_size + hidden_size
    return attention + mlp + 2 * 2 * hidden_size


def encoder_block_tp_plan(prefix: str, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Megatron-style TP for one block at `prefix`: q/k/v/fc1 column-sharded, out_proj/fc2 row-sharded; with
    `sequence_parallel` its norms and residuals on sequence shards (`models.sequence_parallel`)."""
    plan: dict[str, ParallelStyle] = {
        f"{prefix}self_attn.q_proj": ColwiseParallel(),
        f"{prefix}self_attn.k_proj": ColwiseParallel(),
        f"{prefix}self_attn.v_proj": ColwiseParallel(),
        f"{prefix}self_attn.out_proj": RowwiseParallel(),
        f"{prefix}mlp.fc1": ColwiseParallel(),
        f"{prefix}mlp.fc2": RowwiseParallel(),
    }
    if sequence_parallel:
        plan.update({
            f"{prefix}layer_norm1": sharded_norm(),
            f"{prefix}self_attn": gathered_input(),
            f"{prefix}self_attn.out_proj": scattered_output(),
            f"{prefix}layer_norm2": sharded_norm(),
            f"{prefix}mlp": gathered_input(),
            f"{prefix}mlp.fc2": scattered_output(),
        })
    return plan


def encoder_stack_tp_plan(prefix: str, blocks: Iterable[str | int],
                          sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The plan of the blocks at `{prefix}{b}.` for each `b` of `blocks` (their names in call order: a pipeline
    stage's global indices): each block's, and with `sequence_parallel` the stack's input sliced and its output
    gathered (`stack_boundaries`)."""
    blocks = [str(b) for b in blocks]
    plan: dict[str, ParallelStyle] = {}
    for b in blocks:
        plan.update(encoder_block_tp_plan(f"{prefix}{b}.", sequence_parallel))
    if sequence_parallel:
        plan.update(stack_boundaries([f"{prefix}{b}" for b in blocks]))
    return plan


def stage_range(layer_range: tuple[int, int] | None, num_layers: int) -> tuple[int, int]:
    """The blocks [start, end) an encoder builds: all `num_layers` without a range, else one pipeline stage's
    (checked to lie inside the stack)."""
    if layer_range is None:
        return 0, num_layers
    start, end = layer_range
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layer_range {tuple(layer_range)} must be a non-empty range inside the encoder's "
                         f"{num_layers} layers")
    return start, end


class EncoderStage:
    """What every encoder built by `stage_range` knows of its place in the pipeline: `layer_range` of `num_blocks`
    (the stack's depth, set by the encoder)."""

    layer_range: tuple[int, int]
    num_blocks: int

    @property
    def has_front(self) -> bool:
        """Whether this (stage of the) encoder takes the raw items: it holds the front (block 0 on)."""
        return self.layer_range[0] == 0

    @property
    def has_end(self) -> bool:
        """Whether this (stage of the) encoder emits the final tokens: it holds the last block."""
        return self.layer_range[1] == self.num_blocks


def block_stack(layer_range: tuple[int, int], build: Callable[[], nn.Module]) -> nn.ModuleDict:
    """Blocks `build()` keyed by their global index (`layers.N` on every pipeline layout, so checkpoints and
    Hugging Face names match whatever the encoder's PP size)."""
    return nn.ModuleDict({str(i): build() for i in range(*layer_range)})
