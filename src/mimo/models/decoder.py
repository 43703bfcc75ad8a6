"""A Llama-style decoder-only language model that can be built for a range of its layers.

RMSNorm, rotary positions (optionally Llama-3-scaled, or 3-D M-RoPE: Qwen2.5-VL / Qwen3-VL), grouped-query
causal attention (SDPA), SwiGLU MLP, no biases except optional attention ones (Qwen2: q/k/v), optional per-head
RMSNorm on q and k (Qwen3), optional tied input/output embeddings. Built
for `layer_range = (start, end)` it is one pipeline stage: the embedding lives on the stage holding
layer 0, the final norm and output head on the stage holding the last layer, and layers sit in an
`nn.ModuleDict` keyed by their *global* index, so every parameter has the same name on every layout
(`layers.17.mlp.up_proj.weight` is that on whichever stage holds layer 17). Built for several ranges
(`layer_range = ((s0, e0), (s1, e1), ...)`: virtual pipeline stages, the model chunks of one rank) it holds them
all under the same names and `forward(..., chunk=c)` runs chunk c alone.
Parameter names follow Hugging Face's `LlamaModel` (without its `model.` prefix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

from mimo.models.attention import CAUSAL, Attention, compute_dtype, document_attention
from mimo.models.kv_cache import CacheStep, LayerCache
from mimo.models.labels import IGNORE_INDEX
from mimo.models.rmsnorm import RMSNorm
from mimo.models.rotary import Llama3RopeScaling, MRopeLayout, apply_rotary, mrope_tables, rotary_tables
from mimo.models.sequence_parallel import gathered_input, scattered_output, sharded_norm, stack_boundaries

# (mask [B, S], values [n, H]) pairs: embeddings to write over the masked positions of the text embedding.
EmbeddingsAt = Sequence[tuple[torch.Tensor, torch.Tensor]]
# global layer index -> (where, values [n, H]): embeddings added over those positions of that layer's output
# (Qwen3-VL's DeepStack); `where` a bool mask [B, S] or n flat indices into B·S, as in `EmbeddingsAt`.
AddedAfterLayer = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a Llama-style decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    kv_channels: int | None = None  # per-head width when it is not hidden_size / num_heads (Megatron's name)
    qkv_bias: bool = False  # biases on q/k/v (Qwen2; Llama's attention_bias with output_bias)
    output_bias: bool = False  # a bias on the attention's output projection (Llama's attention_bias)
    rope_scaling: Llama3RopeScaling | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3's q_norm / k_norm)
    mrope: MRopeLayout | None = None  # 3-D rotary positions (Qwen2.5-VL sectioned, Qwen3-VL interleaved)
    # DeepStack (Qwen3-VL): modality rows written by `embed` may be [n, H·(1 + k)]: their k-th extra H-wide block is
    # added at the same positions after layer deepstack_layers[k] (transformers' `_deepstack_process`); ascending.
    # A later pipeline stage gets its blocks as `added_after_layer` (the step carries them: training/deepstack.py)
    deepstack_layers: tuple[int, ...] = ()
    # rows of the embedding and the output head when more than vocab_size (Megatron's name): a vocabulary that
    # tensor parallelism does not divide, padded (`padded_for`); the padded ids are never inputs, and their logits
    # are cut off (`Decoder.logits`), so no loss or generation sees them
    padded_vocab_size: int | None = None

    def __post_init__(self) -> None:
        """Reject shapes the attention cannot split evenly, and an M-RoPE layout that does not fit head_dim."""
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} is below vocab_size {self.vocab_size}")
        if self.kv_channels is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.mrope is not None:
            self.mrope.check(self.head_dim)
        layers = self.deepstack_layers
        if any(not 0 <= i < self.num_layers for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"deepstack_layers {list(layers)} must be distinct layers of the {self.num_layers}-layer "
                             f"decoder in ascending order")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def embedding_rows(self) -> int:
        """Rows of the embedding and the output head: the padded vocabulary, if padded."""
        return self.padded_vocab_size or self.vocab_size

    def padded_for(self, tensor_parallel: int, multiple: int | None = None) -> DecoderConfig:
        """This config with its vocabulary padded for `tensor_parallel` ranks (Megatron's
        make_vocab_size_divisible_by) to the next multiple of lcm(`multiple`, `tensor_parallel`), the same for every
        power-of-two TP up to `multiple`; `multiple` None: only where `tensor_parallel` does not divide it, to
        lcm(128, TP) (a vocabulary TP divides keeps its shape)."""
        if multiple is None and self.vocab_size % tensor_parallel == 0:
            return replace(self, padded_vocab_size=None)
        step = math.lcm(multiple or 128, tensor_parallel)
        padded = -(-self.vocab_size // step) * step
        return replace(self, padded_vocab_size=padded if padded != self.vocab_size else None)

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/o (H×heads·d), k/v (H×kv·d), gate/up/down (H×F), two norms,
        and the attention biases and q/k head norms the config asks for."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        biases = (q + 2 * kv) * self.qkv_bias + h * self.output_bias
        head_norms = 2 * self.head_dim * self.qk_norm
        return 2 * h * q + 2 * h * kv + 3 * h * self.ffn_hidden_size + 2 * h + biases + head_norms

    def num_params(self, layer_range: tuple[int, int] | None = None) -> int:
        """Closed-form parameter count of `Decoder(self, layer_range)` (a tied head counted once)."""
        start, end = layer_range or (0, self.num_layers)
        embedding = self.embedding_rows * self.hidden_size
        count = (end - start) * self.layer_params()
        if start == 0:
            count += embedding
        if end == self.num_layers:
            count += self.hidden_size + (0 if self.tie_embeddings and start == 0 else embedding)
        return count

    @classmethod
    def tiny(cls, **overrides: object) -> DecoderConfig:
        """Vocab 256, width 64, 2 layers, 4 heads over 2 KV heads: trains on a CPU in seconds."""
        base = cls(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=128, max_seq_len=256)
        return replace(base, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: object) -> DecoderConfig:
        """A named preset: "tiny", "1b", "3b" or "7b" (Vicuna-7B / Llama-2-7B shape)."""
        if name == "tiny":
            return cls.tiny(**overrides)
        if name not in _PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; expected one of {['tiny', *_PRESETS]}")
        return replace(_PRESETS[name], **overrides)


_PRESETS = {
    "1b": DecoderConfig(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                        ffn_hidden_size=5504),
    "3b": DecoderConfig(vocab_size=32000, hidden_size=3072, num_layers=26, num_heads=24, num_kv_heads=24,
                        ffn_hidden_size=8192),
    "7b": DecoderConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        ffn_hidden_size=11008),
}


class DecoderAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions; heads inferred from the local width."""

    def __init__(self, config: DecoderConfig) -> None:
        """Build the q/k/v/o projections, biased where the config says."""
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=config.output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm, self.k_norm = None, None

    def _heads(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """[B, S, h·d] → [B, h, S, d]; h (-1) is whatever this rank holds: all heads, or its TP shard of them.
        With a `norm`, each head is RMS-normed over its d first (Qwen3's q/k norms, before rotary)."""
        heads = x.unflatten(-1, (-1, self.head_dim))
        return (heads if norm is None else norm(heads)).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention = CAUSAL, cache: LayerCache | None = None) -> torch.Tensor:
        """[B, S, H] → [B, S, H]; cos/sin are the rotary tables of the positions ([S, d], or [B, 1, S, d] per
        token), `attention` which positions each one sees (causal per row, or per document of a packed row).
        With a `cache` (incremental decoding) the S new positions' keys and values are stored after the cached
        ones and the queries attend over all of them."""
        q = apply_rotary(self._heads(self.q_proj(x), self.q_norm), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x), self.k_norm), cos, sin)
        v = self._heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), bias-free."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        """Build the gate, up and down projections."""
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise gated feed-forward: [B, S, H] → [B, S, H]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        """Build the norms, the attention and the MLP."""
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention = CAUSAL, cache: LayerCache | None = None) -> torch.Tensor:
        """One decoder layer: [B, S, H] → [B, S, H] (`cache`: this layer's keys and values so far, when decoding)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def add_at(hidden: torch.Tensor, where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H] with values [n, H] added at `where` (a bool mask [B, S] or n flat indices into B·S), in
    row-major order; out of place, as HF's `_deepstack_process` (`hidden[mask] + values`). A sequence-sharded
    DTensor (sequence parallelism) gets the rows of its own positions (`_add_at_sharded`)."""
    index = where.flatten().nonzero().squeeze(1) if where.dtype == torch.bool else where
    if isinstance(hidden, DTensor):
        return _add_at_sharded(hidden, index, values)
    return hidden.index_put(row_major(index, hidden.shape[1]), values.to(hidden.dtype), accumulate=True)


def row_major(index: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into B·S (rows of `length`) as (row, column) index tensors. A write through them leaves [B, S,
    H] a tensor of its own, where one through the flattened rows gave a view of them: a compiled block guards on
    whether its input is a view, and the first layer (a view) and the others compiled apart (one graph more)."""
    return torch.div(index, length, rounding_mode="floor"), index % length


def _add_at_sharded(hidden: DTensor, index: torch.Tensor, values: torch.Tensor) -> DTensor:
    """`add_at` on a DTensor sharded along the sequence: each rank adds the rows whose positions it holds (the
    others go to a spare row it drops, so their gradient here is exactly zero). Which positions a rank holds: a
    replicated arange of B·S laid out as `hidden` is (a local slice, no traffic). The replicated `values` are
    taken local with a partial gradient, so the backward sums the ranks' rows over the mesh: every rank gets
    the whole gradient, as it would without sequence parallelism."""
    mesh, placements = hidden.device_mesh, hidden.placements
    replicated = [Replicate()] * mesh.ndim
    local = hidden.to_local()
    batch, seq, device = *hidden.shape[:2], local.device
    flat = torch.arange(batch * seq, device=device).view(batch, seq)
    held = DTensor.from_local(flat, mesh, replicated, run_check=False).redistribute(mesh, placements).to_local()
    rows = local.shape[0] * local.shape[1]
    slot = torch.full((batch * seq,), rows, dtype=torch.long, device=device)  # not held: the spare row
    slot[held.flatten()] = torch.arange(rows, device=device)
    partial = [Partial() if p.is_shard() else Replicate() for p in placements]
    mine = DTensor.from_local(values, mesh, replicated, run_check=False).to_local(grad_placements=partial)
    padded = torch.cat([local.flatten(0, 1), local.new_zeros(1, local.shape[-1])])
    added = padded.index_add(0, slot[index.to(device)], mine.to(local.dtype))[:rows].view_as(local)
    return DTensor.from_local(added, mesh, placements, run_check=False, shape=hidden.shape, stride=hidden.stride())


def _chunk_ranges(layer_range: tuple[int, int] | Sequence[tuple[int, int]] | None,
                  num_layers: int) -> tuple[tuple[int, int], ...]:
    """The layer ranges a decoder holds: every layer, one range, or one per model chunk (ascending, disjoint)."""
    if layer_range is None:
        return ((0, num_layers),)
    ranges = (tuple(layer_range),) if isinstance(layer_range[0], int) else tuple(tuple(r) for r in layer_range)
    previous = 0
    for start, end in ranges:
        if not previous <= start < end <= num_layers:
            raise ValueError(f"layer_range {layer_range}: each range must be a non-empty range inside "
                             f"[0, {num_layers}) layers, after the one before")
        previous = end
    return ranges


class Decoder(nn.Module):
    """The language model, or the pipeline stage of it that holds layers [start, end)."""

    def __init__(self, config: DecoderConfig,
                 layer_range: tuple[int, int] | Sequence[tuple[int, int]] | None = None) -> None:
        """Build this stage's layers (one range, or one per model chunk), plus the embedding if it holds layer 0
        and the head if the last."""
        super().__init__()
        self.config = config
        self.chunk_ranges = _chunk_ranges(layer_range, config.num_layers)
        ranges = self.chunk_ranges
        self.layer_range = ranges[0] if len(ranges) == 1 else (ranges[0][0], ranges[-1][1])  # the chunks' span
        self.embed_tokens = nn.Embedding(config.embedding_rows, config.hidden_size) if self.has_embedding else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for start, end in ranges for i in range(start, end)})
        if self.has_head:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.embedding_rows, bias=False)
        else:
            self.norm, self.lm_head = None, None
        self.tie_weights()
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta,
                                 scaling=config.rope_scaling)
        self.register_buffer("rope_cos", cos.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("rope_sin", sin.to(torch.get_default_dtype()), persistent=False)
        if config.mrope is not None:
            self.register_buffer("rope_axes", config.mrope.axes(config.head_dim), persistent=False)

    @property
    def has_embedding(self) -> bool:
        """Whether this stage holds layer 0 and so the input embedding."""
        return self.chunk_ranges[0][0] == 0

    @property
    def has_head(self) -> bool:
        """Whether this stage holds the last layer and so the final norm and the output head."""
        return self.chunk_ranges[-1][1] == self.config.num_layers

    @property
    def head_is_tied(self) -> bool:
        """Whether the head shares the embedding's Parameter (tied embeddings on a stage holding both)."""
        return self.config.tie_embeddings and self.has_embedding and self.has_head

    def chunk_blocks(self, chunk: int) -> list[nn.Module]:
        """Model chunk `chunk`'s layers, in order."""
        start, end = self.chunk_ranges[chunk]
        return [self.layers[str(i)] for i in range(start, end)]

    def chunk_holds_ends(self, chunk: int) -> bool:
        """Whether model chunk `chunk` computes with the parameters outside the layers: the embedding (the chunk
        holding layer 0) or the final norm and head (the one holding the last layer)."""
        start, end = self.chunk_ranges[chunk]
        return start == 0 or end == self.config.num_layers

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        """The parameters model chunk `chunk` computes with: its layers', and the embedding's (the chunk holding
        layer 0) or the final norm's and head's (the one holding the last layer)."""
        start, end = self.chunk_ranges[chunk]
        modules = self.chunk_blocks(chunk)
        if start == 0:
            modules.append(self.embed_tokens)
        if end == self.config.num_layers:
            modules += [self.norm, self.lm_head]
        seen, params = set(), []
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:  # a head tied on this rank shares the embedding's
                    seen.add(id(p))
                    params.append(p)
        return params

    def tie_weights(self) -> None:
        """Make the head reuse the embedding's weight when tied on this stage; call again after TP wrapping."""
        if self.head_is_tied:
            self.lm_head.weight = self.embed_tokens.weight

    def init_aliases(self) -> dict[str, str]:
        """Parameter names to seed as another name: a tied head on a later stage starts as the embedding."""
        return {"lm_head.weight": "embed_tokens.weight"} if self.config.tie_embeddings and self.has_head else {}

    def reset_buffers(self) -> None:
        """Recompute the rotary tables in float64 on the buffers' device and dtype (e.g. after `to_empty`)."""
        c = self.config
        cos, sin = rotary_tables(c.head_dim, c.max_seq_len, c.rope_theta, device=self.rope_cos.device,
                                 scaling=c.rope_scaling)
        self.rope_cos = cos.to(self.rope_cos.dtype)
        self.rope_sin = sin.to(self.rope_sin.dtype)
        if c.mrope is not None:
            self.rope_axes = c.mrope.axes(c.head_dim, device=self.rope_cos.device)

    def embed(self, input_ids: torch.Tensor, embeddings_at: EmbeddingsAt = ()) -> torch.Tensor:
        """Token ids [B, S] → embeddings [B, S, H], with each (where, values [n, H]) of `embeddings_at` written
        over its positions in row-major order; only on the stage holding layer 0. `where` is a bool mask
        [B, S], or n flat indices into B·S: `index_put` (`row_major`), whose backward never syncs the host (the mask's
        `masked_scatter` backward does, to size its `masked_select`)."""
        if self.embed_tokens is None:
            raise RuntimeError(f"this decoder stage holds layers {self.layer_range}, not the embedding")
        hidden = self.embed_tokens(input_ids)
        for where, values in embeddings_at:
            values = values.to(hidden.dtype)
            if where.dtype == torch.bool:
                hidden = hidden.masked_scatter(where.unsqueeze(-1), values)
            else:
                hidden = hidden.index_put(row_major(where, hidden.shape[1]), values)
        return hidden

    def forward(
        self,
        hidden: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        embeddings_at: EmbeddingsAt = (),
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        document_bounds: torch.Tensor | None = None,
        added_after_layer: AddedAfterLayer | None = None,
        scored_positions: torch.Tensor | None = None,
        cache: CacheStep | None = None,
        attention: Attention | None = None,
        chunk: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One stage's whole work in one call (the entry point DDP and FSDP wrap); with several model chunks,
        chunk `chunk`'s (`input_ids` only for the chunk holding layer 0, `labels` for the one holding the last).

        First stage: embed `input_ids` (see `embed`); other stages: take `hidden` [B, S, H]. Then run this
        stage's layers (and the final norm on the last stage); with `labels` (last stage) return
        `(loss_sum, num_label_tokens)`, else the hidden states. A packed row (`mimo.data.packing`) gives
        each token's rotary position (`position_ids` [B, S], restarting per sample; by default 0..S-1) and
        its sample (`document_ids` [B, S]: attention stays inside a sample; by default causal per row), and may
        give the samples' cumulative bounds found on the host (`document_bounds`, `attention.document_bounds`).
        With `config.mrope`, `position_ids` may be 3-D [3, B, S] (temporal, height, width: `models.mrope`).
        `added_after_layer` {global layer index: (where, values)} adds values at those positions of that
        layer's output (Qwen3-VL's DeepStack: `_deepstack_process`); this stage applies the layers it holds.
        `scored_positions` (flat indices into B·S, a superset of the labelled positions) limits the head to them.
        `cache` (incremental decoding, `models.kv_cache`): these are the next positions after the cached ones,
        attended as the step says; give their `position_ids`.
        `attention`, given, replaces the variant `document_ids` would pick: a layout applied from outside (context
        parallelism's, `mimo.context_parallel`, over a chunk of the sequence with `position_ids` of the whole).
        """
        if input_ids is not None:
            embeddings_at, added_after_layer = self._deepstack(embeddings_at, added_after_layer)
            hidden = self.embed(input_ids, embeddings_at)
        attention = self._attention(hidden, document_ids, document_bounds, cache, attention)
        hidden = self._layers(hidden, position_ids, attention, added_after_layer, cache, chunk)
        return self.loss(hidden, labels, scored_positions) if labels is not None else hidden

    def _deepstack(self, embeddings_at: EmbeddingsAt,
                   added: AddedAfterLayer | None) -> tuple[EmbeddingsAt, AddedAfterLayer | None]:
        """Modality rows [n, H·(1 + k)] split into what `embed` writes ([n, H]) and DeepStack's additions after
        `config.deepstack_layers` at the same positions; rows of width H pass through."""
        h, layers = self.config.hidden_size, self.config.deepstack_layers
        if not layers or all(values.shape[-1] == h for _, values in embeddings_at):
            return embeddings_at, added
        added, written = dict(added or {}), []
        for where, values in embeddings_at:
            if values.shape[-1] == h:
                written.append((where, values))
                continue
            if values.shape[-1] != h * (1 + len(layers)):
                raise ValueError(f"modality rows of width {values.shape[-1]}: expected {h} or, with DeepStack "
                                 f"layers {list(layers)}, {h * (1 + len(layers))}")
            main, *extra = values.split(h, dim=-1)
            written.append((where, main))
            for layer, block in zip(layers, extra, strict=True):
                if layer in added:
                    raise ValueError(f"two modalities add DeepStack features after layer {layer}")
                added[layer] = (where, block)
        return written, added

    @staticmethod
    def _attention(hidden: torch.Tensor, document_ids: torch.Tensor | None, document_bounds: torch.Tensor | None,
                   cache: CacheStep | None, attention: Attention | None) -> Attention:
        """What the layers attend with: the KV cache's step, else the layout given from outside, else causal per
        row or, for a packed row, per sample (`document_attention`)."""
        if cache is not None and document_ids is not None:
            raise ValueError("a KV cache decodes padded rows, not packed ones: give no document_ids with a cache")
        if cache is not None:
            return cache
        if attention is not None:
            return attention
        return CAUSAL if document_ids is None else document_attention(document_ids, compute_dtype(hidden),
                                                                      document_bounds)

    def _layers(self, hidden: torch.Tensor, position_ids: torch.Tensor | None, attention: Attention,
                added_after_layer: AddedAfterLayer | None, cache: CacheStep | None, chunk: int) -> torch.Tensor:
        """This stage's layers of model chunk `chunk` (and the final norm after the last layer): [B, S, H] →
        [B, S, H]."""
        start, end = self.chunk_ranges[chunk]
        cos, sin = self._rotary(hidden, position_ids)
        for index in map(str, range(start, end)):
            layer = self.layers[index]
            hidden = layer(hidden, cos, sin, attention, cache=None if cache is None else cache.layer(index))
            if added_after_layer and int(index) in added_after_layer:
                hidden = add_at(hidden, *added_after_layer[int(index)])
        return self.norm(hidden) if end == self.config.num_layers else hidden

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions 0..S-1 ([S, d]), or of each token's `position_ids` ([B, 1, S, d]; [3, B, S]
        positions through the M-RoPE layout); the caller keeps positions under max_seq_len (a packed row may be
        longer: its positions restart per sample)."""
        if position_ids is not None and position_ids.dim() == 3:
            if self.config.mrope is None:
                raise ValueError(f"position_ids of shape {list(position_ids.shape)} are 3-D (M-RoPE) but this "
                                 f"decoder has no mrope layout; give [B, S] positions or set DecoderConfig.mrope")
            cos, sin = mrope_tables(self.rope_cos, self.rope_sin, position_ids, self.rope_axes)
            return cos.to(hidden.dtype), sin.to(hidden.dtype)
        if position_ids is not None:
            return (self.rope_cos[position_ids].unsqueeze(1).to(hidden.dtype),
                    self.rope_sin[position_ids].unsqueeze(1).to(hidden.dtype))
        seq_len = hidden.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.config.max_seq_len}")
        return self.rope_cos[:seq_len].to(hidden.dtype), self.rope_sin[:seq_len].to(hidden.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, S, H] (already normed by `forward`) → logits [B, S, V] of the real vocabulary (a
        padded head's extra rows cut off: the one place the loss and generation take logits from)."""
        if self.lm_head is None:
            raise RuntimeError(f"this decoder stage holds layers {self.layer_range}, not the output head")
        logits = self.lm_head(hidden)
        return logits if self.config.padded_vocab_size is None else logits[..., :self.config.vocab_size]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor,
             scored_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and the number of label tokens; `labels[b, t]` is position t's target. With
        `scored_positions` (flat indices into B·S holding every label) the head runs on those rows alone:
        instruction data labels the answers only, so most logits (a vocabulary wide each) were never scored."""
        targets = labels.flatten()
        if scored_positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, scored_positions).unsqueeze(0)
            targets = targets.index_select(0, scored_positions)
        logits = self.logits(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum", ignore_index=IGNORE_INDEX)
        return loss_sum, (labels != IGNORE_INDEX).sum()

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
        """Megatron-style TP: q/k/v/gate/up column-sharded, o/down row-sharded.

        The embedding is sharded over the vocabulary (`RowwiseParallel`, output all-reduced to a replicated
        [B, S, H]) and the head too (`ColwiseParallel`, logits all-gathered so a plain full-vocabulary
        cross-entropy works). Both shard their weight as Shard(0), so a tied weight stays one tensor:
        `parallelize_module` unshares it, `tie_weights()` (which `init_parameters` calls) re-shares it.
        Note: DTensor's embedding backward yields a Replicate (full-table) gradient for the sharded weight.
        With `sequence_parallel` the layers' norms and residuals run sequence-sharded (`models.sequence_parallel`);
        the embedding stays replicated (modality rows are written at global positions), and so does the final
        norm (the last layer's output is gathered: a stage's output is what the pipeline sends).
        """
        plan: dict[str, ParallelStyle] = {}
        if self.has_embedding:
            plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
        for i in self.layers:
            plan.update({
                f"layers.{i}.self_attn.q_proj": ColwiseParallel(),
                f"layers.{i}.self_attn.k_proj": ColwiseParallel(),
                f"layers.{i}.self_attn.v_proj": ColwiseParallel(),
                f"layers.{i}.self_attn.o_proj": RowwiseParallel(),
                f"layers.{i}.mlp.gate_proj": ColwiseParallel(),
                f"layers.{i}.mlp.up_proj": ColwiseParallel(),
                f"layers.{i}.mlp.down_proj": RowwiseParallel(),
            })
            if self.config.qk_norm:  # on this rank's heads [B, S, h/TP, d]: a weight replicated, its grad summed
                plan.update({f"layers.{i}.self_attn.{norm}": SequenceParallel(sequence_dim=2, use_local_output=True)
                             for norm in ("q_norm", "k_norm")})
            if sequence_parallel:
                plan.update({
                    f"layers.{i}.input_layernorm": sharded_norm(),
                    f"layers.{i}.self_attn": gathered_input(num_args=4),  # (x, cos, sin, attention)
                    f"layers.{i}.self_attn.o_proj": scattered_output(),
                    f"layers.{i}.post_attention_layernorm": sharded_norm(),
                    f"layers.{i}.mlp": gathered_input(),
                    f"layers.{i}.mlp.down_proj": scattered_output(),
                })
        if sequence_parallel:
            for start, end in self.chunk_ranges:  # each chunk is a stack of its own: it sends a whole output
                plan.update(stack_boundaries([f"layers.{i}" for i in range(start, end)], num_args=4))
        if self.has_head:
            plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
        return plan
