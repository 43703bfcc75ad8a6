"""FLOP formulas of the built-in modules: the one place training metrics and the GPU benchmark count from.

Conventions (model FLOPs: what the model needs, not what a kernel or a padded replica happens to run;
one multiply-add = 2 FLOPs):
- **Matmuls.** Only matmul weights count: linear layers (the LM head too, tied or not), the ViT's patch
  conv and the audio stem's convs (each a matmul per output position). Embedding lookups, norms, biases,
  activations, rotary, softmax and the loss are left out. A matmul of N weights over T tokens costs
  2·N·T forward, 2·N·T for its weight gradient when its weights train, and 2·N·T for its input gradient
  when anything upstream of it trains. So a trained module costs 6·N·T, a frozen one that gradients
  pass through 4·N·T, a frozen one with nothing trainable upstream 2·N·T (forward only). The first
  matmul of an encoder reads data (pixels, log-mels), so it never computes an input gradient: 4·N·T.
- **Attention** (no weights): per layer and per item of S tokens, QKᵀ and PV cost 2·S²·h each forward
  (h = heads · head_dim, the query width, also under GQA): 4·S²·h forward, 8·S²·h backward (dQ, dK, dV,
  dP), 12·S²·h for training whenever a gradient flows through it, trained or frozen. The decoder's
  causal mask is *not* discounted by default (full S², PaLM's MFU convention, and what
  `torch.utils.flop_counter` measures); `causal_half=True` counts only the S·(S+1)/2 unmasked scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mimo.models import AudioConfig, DecoderConfig, ViTConfig
from mimo.models.qwen_vision import Qwen3VisionConfig, QwenVisionConfig
from mimo.models.qwen_vision_geometry import window_sizes

_AUDIO_KERNEL = 3  # the audio stem's conv width (mimo.models.audio)


def matmul_flops(weights: int, tokens: int, *, trainable: bool = True, input_grad: bool = True) -> int:
    """FLOPs of a matmul of `weights` over `tokens`: 2·N·T forward, +2·N·T per gradient it computes."""
    passes = 1 + int(trainable) + int(input_grad)
    return 2 * passes * weights * tokens


def attention_flops(seq_len: int, width: int, layers: int, items: int, *, backward: bool,
                    causal_half: bool = False) -> int:
    """Score and value matmuls of `layers` attention layers over `items` sequences: 4·S²·h each forward."""
    scores = seq_len * (seq_len + 1) // 2 if causal_half else seq_len * seq_len
    return (3 if backward else 1) * 4 * scores * width * layers * items


def decoder_matmul_weights(config: DecoderConfig) -> int:
    """Matmul weights of the whole decoder: q/k/v/o and gate/up/down per layer, plus the LM head."""
    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.ffn_hidden_size
    return config.num_layers * per_layer + h * config.vocab_size


def encoder_block_weights(hidden_size: int, ffn_hidden_size: int) -> int:
    """Matmul weights of one encoder block (ViT, audio): q/k/v/out (H×H) and fc1/fc2 (H×F)."""
    return 4 * hidden_size * hidden_size + 2 * hidden_size * ffn_hidden_size


def decoder_flops(config: DecoderConfig, batch: int, seq_len: int, *, trainable: bool = True,
                  input_grad: bool = False, causal_half: bool = False) -> int:
    """One step's FLOPs of the decoder over `batch` sequences of `seq_len` tokens (padding included).

    `input_grad`: the gradient must reach the input embeddings (a trainable modality feeds a frozen
    decoder). A trainable decoder backpropagates to its embedding table anyway, so every matmul computes
    its input gradient then.
    """
    backward = trainable or input_grad
    dense = matmul_flops(decoder_matmul_weights(config), batch * seq_len, trainable=trainable, input_grad=backward)
    attention = attention_flops(seq_len, config.hidden_size, config.num_layers, batch, backward=backward,
                                causal_half=causal_half)
    return dense + attention


def packed_decoder_flops(config: DecoderConfig, positions: int, documents: Sequence[int], *, trainable: bool = True,
                         input_grad: bool = False, causal_half: bool = False) -> int:
    """`decoder_flops` for packed rows: the matmuls over the `positions` computed (a row's rounding tail
    included), attention within each document of `documents` lengths (the document mask skips the rest)."""
    backward = trainable or input_grad
    dense = matmul_flops(decoder_matmul_weights(config), positions, trainable=trainable, input_grad=backward)
    return dense + sum(attention_flops(length, config.hidden_size, config.num_layers, 1, backward=backward,
                                       causal_half=causal_half) for length in documents)


def _encoder_flops(stem: list[tuple[int, int]], block_weights: int, seq_len: int, layers: int, width: int,
                   items: int, trainable: bool) -> int:
    """An encoder: stem matmuls [(weights, tokens per item)], the first reading data, then `layers` blocks."""
    (first_weights, first_tokens), *rest = stem
    total = matmul_flops(first_weights, first_tokens * items, trainable=trainable, input_grad=False)
    for weights, tokens in rest:
        total += matmul_flops(weights, tokens * items, trainable=trainable, input_grad=trainable)
    total += matmul_flops(block_weights * layers, seq_len * items, trainable=trainable, input_grad=trainable)
    return total + attention_flops(seq_len, width, layers, items, backward=trainable)


def vit_flops(config: ViTConfig, num_images: int, *, trainable: bool = True) -> int:
    """One step's FLOPs of the ViT over `num_images`: the patch conv, then the built blocks over patches + 1.

    The blocks see the class token (it is dropped only after the selected layer); only the layers up to
    `select_layer` are built and counted. A frozen ViT runs forward only (its input is data).
    """
    h = config.hidden_size
    patch_weights = config.num_channels * config.patch_size**2 * h
    blocks = encoder_block_weights(h, config.ffn_hidden_size)
    return _encoder_flops([(patch_weights, config.num_patches)], blocks, config.num_patches + 1,
                          config.num_layers_built, h, num_images, trainable)


def audio_flops(config: AudioConfig, num_items: int, *, trainable: bool = True) -> int:
    """One step's FLOPs of the audio encoder over `num_items` clips: two stem convs, then the blocks."""
    h, tokens = config.hidden_size, config.tokens_per_item
    stem = [(config.n_mels * _AUDIO_KERNEL * h, config.num_frames), (h * _AUDIO_KERNEL * h, tokens)]
    blocks = encoder_block_weights(h, config.ffn_hidden_size)
    return _encoder_flops(stem, blocks, tokens, config.num_layers, h, num_items, trainable)


def projector_flops(in_features: int, hidden_features: int, out_features: int, tokens: int, *,
                    trainable: bool = True, input_grad: bool = False) -> int:
    """One step's FLOPs of the MLP projector over `tokens`; `input_grad`: the encoder before it trains."""
    fc1 = matmul_flops(in_features * hidden_features, tokens, trainable=trainable, input_grad=input_grad)
    fc2 = matmul_flops(hidden_features * out_features, tokens, trainable=trainable,
                       input_grad=trainable or input_grad)
    return fc1 + fc2


EncoderFormula = Callable[..., int]  # (encoder config, items, *, trainable) -> one step's FLOPs: vit_flops, audio_flops


@dataclass(frozen=True)
class ModalityFlops:
    """What the FLOP count needs of one modality: its encoder's config and formula (the family names it: no
    dispatch on config types here), projector width, what is frozen."""

    encoder: Any  # the encoder's config: hidden_size, tokens_per_item and what its formula reads
    formula: EncoderFormula
    projector_hidden: int | None = None  # None: the language model's hidden size (LLaVA's mlp2x_gelu)
    freeze_encoder: bool = False
    freeze_projection: bool = False
    has_projector: bool = True  # False: the encoder ends at the language width (Qwen-VL's tower and its merger)

    @property
    def tokens_per_item(self) -> int:
        """Tokens one item sends to the projector (and the language model)."""
        return self.encoder.tokens_per_item

    def encoder_flops(self, items: int | torch.Tensor) -> int:
        """The encoder's FLOPs over `items`: a count, or packed items' grids [n, k] (their formula reads them)."""
        if isinstance(items, torch.Tensor) and not items.numel():
            return 0
        return self.formula(self.encoder, items, trainable=not self.freeze_encoder)

    def projection_flops(self, items: int | torch.Tensor, out_features: int) -> int:
        """The projector's FLOPs over the tokens of `items` (none without a projector)."""
        if not self.has_projector:
            return 0
        hidden = self.projector_hidden or out_features
        return projector_flops(self.encoder.hidden_size, hidden, out_features, items * self.tokens_per_item,
                               trainable=not self.freeze_projection, input_grad=not self.freeze_encoder)

    @property
    def trains(self) -> bool:
        """Whether anything in this modality trains (so a frozen language model must pass gradients)."""
        return not (self.freeze_encoder and self.freeze_projection)


def mimo_step_flops_by_module(language: DecoderConfig, samples: int, seq_len: int,
                              modalities: Mapping[str, ModalityFlops] | None = None,
                              items: Mapping[str, int | torch.Tensor] | None = None, *, freeze_language: bool = False,
                              causal_half: bool = False) -> dict[str, int]:
    """One step's FLOPs per part: `{name}.encoder`, `{name}.projection` per modality, then `language`.

    `samples` sequences of `seq_len` tokens (modality tokens included) go through the language model;
    `items[name]` items through modality `name` (0 when absent).
    """
    modalities, items = dict(modalities or {}), dict(items or {})
    unknown = sorted(set(items) - set(modalities))
    if unknown:
        raise ValueError(f"items given for unknown modalities {unknown}; modalities are {sorted(modalities)}")
    out: dict[str, int] = {}
    for name, spec in modalities.items():
        n = items.get(name, 0)
        out[f"{name}.encoder"] = spec.encoder_flops(n)
        out[f"{name}.projection"] = spec.projection_flops(n, language.hidden_size)
    upstream_trains = any(spec.trains for spec in modalities.values())
    out["language"] = decoder_flops(language, samples, seq_len, trainable=not freeze_language,
                                    input_grad=upstream_trains, causal_half=causal_half)
    return out


def mimo_step_flops(language: DecoderConfig, samples: int, seq_len: int,
                    modalities: Mapping[str, ModalityFlops] | None = None,
                    items: Mapping[str, int | torch.Tensor] | None = None, *, freeze_language: bool = False,
                    causal_half: bool = False) -> int:
    """One training step's model FLOPs (all ranks together): the sum of `mimo_step_flops_by_module`."""
    return sum(mimo_step_flops_by_module(language, samples, seq_len, modalities, items,
                                         freeze_language=freeze_language, causal_half=causal_half).values())


def modalities_from_provider(provider: Any, formulas: Mapping[str, EncoderFormula]) -> dict[str, ModalityFlops]:
    """A `MimoModelProvider`'s modalities (encoder config, projector width, freezing) for the formulas, each
    modality's encoder counted by `formulas[name]` (its family's choice)."""
    out = {}
    for name, spec in provider.modality_submodules_spec.items():
        encoder, projection = spec.submodules.get("encoder"), spec.submodules.get("projection")
        config = encoder.params.get("config") if encoder is not None else None
        if config is None or projection is None or name not in formulas:
            raise TypeError(f"no FLOP formula for modality {name!r}: its family names none, or its encoder has "
                            f"no config or it has no MLP projection")
        out[name] = ModalityFlops(config, formulas[name], projection.params.get("hidden_features"),
                                  provider.freeze_modality_encoders.get(name, False),
                                  provider.freeze_modality_projections.get(name, False))
    return out


def batch_flops(provider: Any, batch: Any, modalities: Mapping[str, ModalityFlops], *, causal_half: bool = False,
                packed: PackedRows | None = None) -> int:
    """One training step's model FLOPs of `provider`'s model (its `modalities`, as its family counts them:
    `ModelFamily.modality_flops`) on a global `MimoBatch`: the language model over the padded [N, S] text, or
    over `packed` rows when the run packs its samples."""
    language = provider.language_model_spec.params.get("config")
    if not isinstance(language, DecoderConfig):
        raise TypeError("no FLOP formula for the language model: it must be built from a DecoderConfig")
    items = {name: b.item_grids if b.packed else int(b.items.shape[0]) for name, b in batch.modality_inputs.items()}
    by_module = mimo_step_flops_by_module(language, batch.num_samples, int(batch.input_ids.shape[1]), modalities,
                                          items, freeze_language=provider.freeze_language_model,
                                          causal_half=causal_half)
    if packed is not None:
        by_module["language"] = packed_decoder_flops(
            language, packed.positions, packed.documents, trainable=not provider.freeze_language_model,
            input_grad=any(spec.trains for spec in modalities.values()), causal_half=causal_half)
    return sum(by_module.values())


@dataclass(frozen=True)
class PackedRows:
    """What packed rows hand the language model: `positions` computed in all, and each sample's length
    (`documents`), within which alone it attends."""

    positions: int
    documents: Sequence[int]


# -- Qwen-VL vision towers (packed images of any size) ---------------------------------------------------------
@dataclass(frozen=True)
class VisionFlops:
    """One step's FLOPs of a packed vision tower: its matmuls, and attention in full and in windowed layers."""

    dense: int
    full_attention: int
    window_attention: int

    @property
    def total(self) -> int:
        """All of it."""
        return self.dense + self.full_attention + self.window_attention


def qwen_vision_flops(config: QwenVisionConfig, grid_thw: Sequence[Sequence[int]], *,
                      trainable: bool = True) -> VisionFlops:
    """One step's FLOPs of a Qwen2.5-VL / Qwen3-VL tower over packed items of `grid_thw` rows (t, h, w).

    Matmuls: the patch embedding (reads data: no input gradient), q|k|v, proj and the MLP (SwiGLU: three
    matrices; GELU: two) over every patch, the merger (and each DeepStack merger) over the merged tokens.
    Attention (`attention_flops`): per frame in full-attention layers (all of Qwen3-VL's), per window in
    Qwen2.5-VL's windowed ones: the sum of S² over the blocks the block-diagonal mask keeps, never over the call.
    A frozen tower runs forward only.
    """
    h, f, m = config.hidden_size, config.intermediate_size, config.merge_unit
    rows = [tuple(int(v) for v in row) for row in grid_thw]
    patches = sum(t * gh * gw for t, gh, gw in rows)
    qwen3 = isinstance(config, Qwen3VisionConfig)
    block = 4 * h * h + (2 if qwen3 else 3) * h * f
    mergers = 1 + (len(config.deepstack_visual_indexes) if qwen3 else 0)
    merger = (m * h) * (m * h) + (m * h) * config.out_hidden_size
    dense = (matmul_flops(config.patch_dim * h, patches, trainable=trainable, input_grad=False)
             + matmul_flops(block * config.depth, patches, trainable=trainable, input_grad=trainable)
             + matmul_flops(merger * mergers, patches // m, trainable=trainable, input_grad=trainable))
    full_layers = config.depth if qwen3 else len(config.fullatt_block_indexes)
    frames = [gh * gw for t, gh, gw in rows for _ in range(t)]
    full = sum(attention_flops(s, h, full_layers, 1, backward=trainable) for s in frames)
    windowed = 0
    if not qwen3:
        windows = [s for t, gh, gw in rows
                   for s in window_sizes(t, gh, gw, config.spatial_merge_size, config.window_tokens)]
        windowed = sum(attention_flops(s, h, config.depth - full_layers, 1, backward=trainable) for s in windows)
    return VisionFlops(dense, full, windowed)
