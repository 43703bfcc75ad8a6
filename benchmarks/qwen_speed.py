"""Qwen2.5-VL training speed on one GPU (issue 31, "Speed"): mimo's step against transformers'
`Qwen2_5_VLForConditionalGeneration` in a plain compiled loop, and the vision tower alone against HF's.

    PYTHONPATH=src timeout 590 python benchmarks/qwen_speed.py --json qwen_speed.json   # GPU: every row, ~6 min
    PYTHONPATH=src python benchmarks/qwen_speed.py --rows mimo,hf,hf+packed             # GPU: the full rows
    PYTHONPATH=src python benchmarks/qwen_speed.py --vit-only                           # GPU: the two ViT rows
    PYTHONPATH=src python benchmarks/qwen_speed.py --tiny                               # CPU smoke run, < 60 s

A GPU run: 16 samples in 4 micro-batches, 2 warm-up steps (compilation), 4 timed steps per row; each row prints
its JSON line when it ends (`row_s`: its wall time, build and compilation included). Rows that compile graphs an
earlier row compiled (the towers; HF's second row) reuse inductor's on-disk cache.

Shapes: the `qwen2.5-vl-7b` preset (`mimo.families.qwen_vl.hf_presets`: Qwen2.5-VL-7B-Instruct's config.json) with
random weights, `--lm-layers` of its 28 decoder layers (default 8) and the whole 32-layer vision tower. The full 7B
cannot train on one 80 GB GPU at this precision whatever the recomputation: float32 parameters, gradients and
AdamW's two moments are 16 bytes a parameter, 133 GB for its 8.3 B; 8 layers make 3.6 B, 54 GiB before
activations (each layer 3.5 GiB more; all 28 make 124 GiB: an H200 may just hold them, `--lm-layers 28`). mimo
and HF build from the same config dict (HF: `Qwen2_5_VLConfig.from_dict`).

Data (`--seed`, fixed): `--samples` samples, one image each, sides drawn uniformly from 256-1280 px, resized as the
processor's `smart_resize` does (28-px multiples) into 14-px patches (random values: only shapes matter); text of
instruction length: a prompt of 48-160 tokens, the image (<|vision_start|> <|image_pad|>×n <|vision_end|>), an
answer of 32-224 tokens, scored on the answer only (at the defaults: 16,166 tokens, 48,632 patches, 441 model TFLOP
a step; HF's padded rows hold 23,160 positions). The same global batch every step, split into `--microbatches`
gradient-accumulation micro-batches of consecutive samples, the same for every row.

Rows (`--rows`, comma separated; `--vit-only`: the vit rows alone):
- `mimo`: `MimoTrainer.train_step` on a world of one, built as `mimo train` builds it (config `train.dtype:
  bfloat16`, `compile: true`, `recompute_granularity: full`, `data.packing: true`): each micro-batch's samples
  packed into one row (document-causal flex attention, M-RoPE positions per sample), the tower's images packed
  (block-diagonal per image / per window). On a mimo whose `compile` / recomputation do not reach the tower's
  `blocks.N` (before `distributed._BLOCK` took them) this script applies the same two to them, with a note.
  Initial values drawn on the GPU (`DeviceDraws`: mimo's statistics, not its per-parameter CPU draw);
- `hf`: HF's model in a plain loop: padded micro-batches (right padding, attention mask), M-RoPE positions given
  (transformers' `get_rope_index`, computed on the host outside the step, as a data loader would);
- `hf+packed`: the same, each micro-batch's samples in one row, no attention mask, 4-row position ids (text
  positions first): transformers 5's packed-sequence masking; the closest HF gets to mimo's packing;
- `vit-mimo`: mimo's packed `Qwen25VisionTower` (src/mimo/models/qwen_vision.py), forward + backward of
  mean(out²) over the same micro-batches' images;
- `vit-hf`: HF's `Qwen2_5_VisionTransformerPretrainedModel` (its cu_seqlens path) on the same inputs.

Precision, every row: float32 parameters (the master weights), forward under bf16 autocast (mimo's
`train.dtype: bfloat16`; HF: `torch.autocast`, the same policy, not bf16 parameters); full rows: fused AdamW
(lr 1e-4, betas 0.9/0.95, no weight decay; mimo: its own AdamW and schedule), clipping at norm 1.0. Compiled: every
decoder layer and vision block (`torch.compile` of each block's forward, mimo's `compile: true`, on both sides);
recomputed: every block, torch's non-reentrant checkpoint around the compiled forward, on both sides (HF: not
`gradient_checkpointing_enable`, see `compile_and_recompute_hf`). HF attention: `sdpa`, or
`flash_attention_2` where flash_attn is installed (`--hf-attn`); mimo's attention on CUDA in bf16 is torch's varlen
kernel (packed rows and the towers' segments alike). HF's vision attention without a flash implementation loops over
cu_seqlens chunks in Python (`.tolist()`), which a compiled block would re-trace for each micro-batch's set of image
sizes: there the attention is left out of the block's graph (`torch.compiler.disable`). `--hf-vision-attn
torch-varlen` gives HF's vision blocks its cu_seqlens path on torch's varlen kernel, mimo's (registered through
transformers' `AttentionInterface`): the towers then differ in everything but the attention kernel.

Timing: `--warmup` steps (default 2: compilation), then `--steps` timed ones (default 4), CUDA events around
each; step_ms is the median. tokens/s counts the batch's real tokens (each sample's positions up to its last scored
label, image tokens included, no padding: `mimo.data.packing.real_tokens`), the same count for every full row;
the ViT rows count patches/s. Model FLOPs (no recomputation counted) from `mimo.flops`: `packed_decoder_flops` over
the samples' lengths and `qwen_vision_flops` (dense, full-attention and window-attention parts reported apart);
MFU against a bf16 8192² matmul measured in the same run (`mfu`) and against the card's dense bf16 peak
(`mfu_nominal`: 989 TFLOP/s for H100/H200 SXM). One JSON line per row on stdout as each row ends (and every
record in `--json`), then the ratios mimo / HF.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # llava_speed, beside us

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from llava_speed import (  # noqa: E402
    _free,
    hf_available,
    init_like_mimo,
    init_world,
    measure_peak,
    row_error,
    timed_steps,
    trace_step,
)
from torch import nn  # noqa: E402

from mimo.cli import positive_int  # noqa: E402
from mimo.data import MimoBatch  # noqa: E402
from mimo.data.batch import Sample  # noqa: E402
from mimo.data.packing import real_tokens, sample_extents  # noqa: E402
from mimo.data.qwen_image import smart_resize  # noqa: E402
from mimo.families.qwen_vl import IMAGES, QwenVLMimoProvider, QwenVLSpec, qwen_vl_spec  # noqa: E402
from mimo.families.qwen_vl.hf_presets import PRESET_CONFIGS  # noqa: E402
from mimo.flops import packed_decoder_flops, qwen_vision_flops  # noqa: E402
from mimo.gemm_alignment import align_linears  # noqa: E402
from mimo.models.labels import IGNORE_INDEX  # noqa: E402
from mimo.models.mrope import get_rope_index, packed_rope_index  # noqa: E402
from mimo.models.qwen_vision import Qwen25VisionTower  # noqa: E402
from mimo.training.metrics import Clock  # noqa: E402

LR, BETAS, CLIP = 1e-4, (0.9, 0.95), 1.0
NOMINAL_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense bf16, SXM
FULL_ROWS, VIT_ROWS = ("mimo", "hf", "hf+packed"), ("vit-mimo", "vit-hf")


@dataclass(frozen=True)
class Shapes:
    """What a run builds and feeds: the preset, decoder layers kept, the batch and its images' and texts' sizes."""

    preset: str = "qwen2.5-vl-7b"
    lm_layers: int = 8
    samples: int = 16
    microbatches: int = 4
    sides: tuple[int, int] = (256, 1280)  # image side in pixels, each drawn uniformly
    pixels: tuple[int, int] = (3136, 12845056)  # the processor's min_pixels / max_pixels (Qwen2.5-VL-7B-Instruct)
    prompt: tuple[int, int] = (48, 160)  # prompt tokens before the image
    answer: tuple[int, int] = (32, 224)  # scored answer tokens after it
    vocab_size: int | None = None  # None: the preset's (tiny: widened so the special ids lie inside, as HF needs)
    text_vocab: int = 151643  # text ids are drawn below this (the 7B's first special token, <|endoftext|>)
    pad_id: int = 151643  # HF's padding (<|endoftext|>), never attended nor scored
    compile: bool = True
    recompute: bool = True


TINY = Shapes(preset="tiny-qwen2.5-vl", lm_layers=2, samples=4, microbatches=2, sides=(8, 40), pixels=(16, 4096),
              prompt=(3, 8), answer=(3, 8), vocab_size=320, text_vocab=256, pad_id=0, compile=False,
              recompute=True)


def model_config(shapes: Shapes) -> dict[str, Any]:
    """The preset's config.json dict with `lm_layers` decoder layers (and the tiny vocabulary widened)."""
    config = copy.deepcopy(PRESET_CONFIGS[shapes.preset])
    config["text_config"]["num_hidden_layers"] = shapes.lm_layers
    if shapes.vocab_size is not None:
        config["text_config"]["vocab_size"] = shapes.vocab_size
    return config


# -- the data --------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The global batch as mimo takes it, as HF takes it (padded and packed micro-batches, host-side, pinned on a
    GPU), its images per micro-batch, and what it counts: real tokens, model FLOPs."""

    batch: MimoBatch
    hf_padded: list[dict[str, torch.Tensor]]
    hf_packed: list[dict[str, torch.Tensor]]
    images: list[tuple[torch.Tensor, torch.Tensor]]  # per micro-batch: packed patches, grid_thw
    label_tokens: int
    tokens: int
    patches: int
    flops: dict[str, int]


def make_samples(spec: QwenVLSpec, shapes: Shapes, seed: int) -> list[Sample]:
    """One image per sample: prompt, <|vision_start|> image tokens <|vision_end|>, answer (scored); random values."""
    vision = spec.vision
    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    samples = []
    for _ in range(shapes.samples):
        height, width = smart_resize(draw(*shapes.sides), draw(*shapes.sides), vision.patch_size *
                                     vision.spatial_merge_size, *shapes.pixels)
        grid = torch.tensor([[1, height // vision.patch_size, width // vision.patch_size]])
        patches = int(grid.prod())
        prompt = torch.randint(0, shapes.text_vocab, (draw(*shapes.prompt),), generator=gen)
        answer = torch.randint(0, shapes.text_vocab, (draw(*shapes.answer),), generator=gen)
        image = torch.tensor([spec.vision_start_token_id, *[spec.image_token_id] * (patches // vision.merge_unit),
                              spec.vision_end_token_id])
        ids = torch.cat([prompt, image, answer])
        labels = torch.full_like(ids, IGNORE_INDEX)
        start = ids.numel() - answer.numel()
        labels[start - 1:-1] = answer  # position t's target is ids[t + 1]: the answer tokens only
        pixels = torch.randn(patches, vision.patch_dim, generator=gen)
        samples.append(Sample(ids, labels, {IMAGES: pixels}, {IMAGES: grid}))
    return samples


def hf_micro(share: MimoBatch, lengths: list[int], spec: QwenVLSpec, pad_id: int, packed: bool
             ) -> dict[str, torch.Tensor]:
    """A micro-batch as HF's keyword arguments: labels shifted as HF shifts them back (position t scores
    labels[t + 1]); padded rows with an attention mask, or one packed row with 4-row position ids."""
    merge, image_id = spec.vision.spatial_merge_size, spec.image_token_id
    items = share.modality_inputs[IMAGES]
    ids = [share.input_ids[i, :n] for i, n in enumerate(lengths)]
    labels = [torch.cat([torch.tensor([IGNORE_INDEX]), share.labels[i, :n - 1]]) for i, n in enumerate(lengths)]
    out = {"pixel_values": items.items, "image_grid_thw": items.item_grids}
    if packed:
        row = torch.cat(ids)[None]
        documents = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
        text = torch.cat([torch.arange(n) for n in lengths])[None, None]
        mrope = packed_rope_index(row, documents, items.item_grids, merge, image_id)
        return {**out, "input_ids": row, "labels": torch.cat(labels)[None], "position_ids": torch.cat([text, mrope])}
    width = max(lengths)
    padded = torch.full((len(lengths), width), pad_id)
    hf_labels = torch.full((len(lengths), width), IGNORE_INDEX)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        padded[i, :n], hf_labels[i, :n], mask[i, :n] = ids[i], labels[i], 1
    positions = get_rope_index(padded, items.item_grids, merge, image_id, attention_mask=mask)[0]
    return {**out, "input_ids": padded, "labels": hf_labels, "attention_mask": mask, "position_ids": positions}


def make_data(spec: QwenVLSpec, shapes: Shapes, seed: int, pin: bool) -> Data:
    """The run's one global batch in every form the rows take, and its counts."""
    samples = make_samples(spec, shapes, seed)
    pad_id = shapes.pad_id
    batch = MimoBatch.collate(samples, pad_id)
    lengths = [s.input_ids.numel() for s in samples]
    specials = {IMAGES: spec.image_token_id}
    padded, packed, images = [], [], []
    per = shapes.samples // shapes.microbatches
    for m in range(shapes.microbatches):
        share = batch.microbatch(m, shapes.microbatches)
        mine = lengths[m * per:(m + 1) * per]
        padded.append(hf_micro(share, mine, spec, pad_id, packed=False))
        packed.append(hf_micro(share, mine, spec, pad_id, packed=True))
        items = share.modality_inputs[IMAGES]
        images.append((items.items, items.item_grids))
    if pin:
        batch = batch.pin_memory()
        padded = [{k: v.pin_memory() for k, v in d.items()} for d in padded]
        packed = [{k: v.pin_memory() for k, v in d.items()} for d in packed]
        images = [(p.pin_memory(), g) for p, g in images]
    grids = batch.modality_inputs[IMAGES].item_grids
    extents = sample_extents(batch.input_ids, batch.labels, specials)
    vision = qwen_vision_flops(spec.vision, grids.tolist())
    language = packed_decoder_flops(spec.language, int(extents.sum()), [int(n) for n in extents.tolist()])
    flops = {"language": language, "vision_dense": vision.dense, "vision_full_attention": vision.full_attention,
             "vision_window_attention": vision.window_attention, "vision": vision.total,
             "total": language + vision.total}
    return Data(batch, padded, packed, images, batch.num_label_tokens(specials), real_tokens(batch, specials),
                int(grids.prod(dim=1).sum()), flops)


# -- rows --------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every row builds from: the shapes, the config dict and its spec, the data, the device, HF's attention."""

    shapes: Shapes
    config: dict[str, Any]
    spec: QwenVLSpec
    data: Data
    device: torch.device
    hf_attn: str
    weights: Any = None  # a `ParameterSource` for mimo's model (tests: an HF directory's), else `DeviceDraws`
    hf_vision_attn: str | None = None  # HF's vision attention where it differs from hf_attn (`TORCH_VARLEN`)
    mimo_sets: tuple[str, ...] = ()  # `mimo train --set KEY=VALUE` overrides for the mimo row (levers to compare)


@dataclass
class Row:
    """A built row: one step, its last loss, notes on how it was built."""

    step: Callable[[], None]
    loss: Callable[[], float]
    notes: list[str] = field(default_factory=list)


def _autocast(device: torch.device):
    """bf16 autocast on the GPU (mimo's `train.dtype: bfloat16` policy), nothing on the CPU."""
    if device.type != "cuda":  # the CPU smoke run computes in float32
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors on `device`, copied from pinned memory without blocking the host."""
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


class DeviceDraws:
    """A `ParameterSource` that draws every parameter on its own device: mimo's initial statistics (norm weights
    one, biases zero, the rest normal(0, 0.02)) without its per-parameter CPU draw (tens of seconds at 3.6 B)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.generators = seed, {}

    def fill(self, name: str, param: torch.Tensor) -> bool:
        """Write a value into `param` (a 1-D weight is a norm's) and say it is done."""
        device = param.device
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=self.generators[device])
        return True


def cover_tower_blocks(tower: nn.Module, compile_: bool, recompute: bool) -> None:
    """Compile each of the tower's `blocks.N` (as `mimo.distributed.compile_blocks` does) and recompute it."""
    from mimo.distributed import _compile_blocks_settings
    from mimo.recompute import recompute_blocks

    blocks = list(tower.blocks.values())
    if compile_:
        _compile_blocks_settings()
        for block in blocks:
            block.forward = torch.compile(block.forward)
    if recompute:
        recompute_blocks(blocks)


def build_mimo(ctx: Context) -> Row:
    """The model, trainer and step as `mimo train` builds them (mimo.training.loop), on the benchmark's spec."""
    from mimo.distributed import _blocks, unwrap
    from mimo.training.loop import build_trainer
    from mimo.training.run_config import overridden, parse_run_config

    shapes = ctx.shapes
    init_world(ctx.device)
    config = parse_run_config(overridden({
        "model": {"family": "qwen_vl", "preset": shapes.preset},
        "parallelism": {"images": {}, "language": {}},
        "train": {"global_batch_size": shapes.samples, "num_microbatches": shapes.microbatches,
                  "dtype": "bfloat16" if ctx.device.type == "cuda" else "float32", "lr": LR, "clip_grad": CLIP,
                  "weight_decay": 0.0, "steps": 10**6, "compile": shapes.compile,
                  "recompute_granularity": "full" if shapes.recompute else "none"},
        "data": {"name": "synthetic", "packing": True},
    }, ctx.mimo_sets))
    # the preset's provider, with the benchmark's decoder depth (plan_model would build the preset's 28 layers)
    weights = ctx.weights if ctx.weights is not None else DeviceDraws(config.train.seed)
    provider = QwenVLMimoProvider(ctx.spec, config.layout, params_dtype=config.precision.param_dtype,
                                  seed=config.train.seed, device=ctx.device, initial_weights=weights)
    model = provider.provide_distributed_model(config.distributed_config)
    notes = []
    images = unwrap(model.modality_submodules[IMAGES])
    if (shapes.compile or shapes.recompute) and not _blocks(images):  # mimo before its `blocks.N` fix
        cover_tower_blocks(images.encoder, shapes.compile, shapes.recompute)
        notes.append("tower blocks compiled / recomputed by this script: this mimo's train.compile and "
                     "recompute_granularity reach `layers.N` blocks only (mimo.distributed._BLOCK)")
    trainer = build_trainer(config, provider, model, ctx.device)
    state: dict[str, Any] = {}
    batch = ctx.data.batch

    def step() -> None:
        state["result"] = trainer.train_step(batch)

    return Row(step, lambda: state["result"].loss, notes)


def hf_config(ctx: Context):
    """transformers' Qwen2_5_VLConfig from the same config dict mimo's spec was read from."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict({k: v for k, v in ctx.config.items() if k != "model_type"})


TORCH_VARLEN = "flash_torch_varlen"  # "flash" in the name: transformers 5.25 sends such attention cu_seqlens


def torch_varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                           cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF's attention-interface signature over torch's varlen kernel (mimo's `varlen_attention`, the one mimo's
    tower runs): query [1, H, N, D] cut at cu_seq_lens_q, bidirectional; out [1, N, H, D] as flash's is."""
    from mimo.models import attention

    if cu_seq_lens_q is None:  # one sequence
        n = query.shape[2]
        cu_seq_lens_q, max_length_q = torch.tensor([0, n], dtype=torch.int32, device=query.device), n
    out = attention.varlen_attention(query, key, value, cu_seq_lens_q.to(torch.int32), int(max_length_q),
                                     attention.varlen_options(causal=False))
    return out.transpose(1, 2), None


def use_vision_attention(visual: nn.Module, ctx: Context) -> list[str]:
    """Point HF's vision attention at `ctx.hf_vision_attn` (`TORCH_VARLEN`: registered in transformers'
    AttentionInterface); refused in one line where this transformers would not hand it cu_seqlens."""
    if ctx.hf_vision_attn is None:
        return []
    import inspect

    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    name = TORCH_VARLEN if ctx.hf_vision_attn == "torch-varlen" else ctx.hf_vision_attn
    if name == TORCH_VARLEN:
        source = inspect.getsource(modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention.forward)
        if "is_flash_attention_requested" not in source:
            raise RuntimeError("this transformers passes cu_seqlens to flash_attention_2 alone; --hf-vision-attn "
                               "torch-varlen needs one that asks is_flash_attention_requested (5.25 does)")
        AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
    visual.config._attn_implementation = name
    return [f"vision attn={name}"]


def vision_attention_name(ctx: Context) -> str:
    """The attention implementation HF's vision blocks run."""
    return {None: ctx.hf_attn, "torch-varlen": TORCH_VARLEN}.get(ctx.hf_vision_attn, ctx.hf_vision_attn)


def compile_and_recompute_hf(layers: list[nn.Module], vision: list[nn.Module], ctx: Context) -> list[str]:
    """HF's decoder layers and vision blocks compiled and recomputed as mimo does it: `torch.compile` of each one's
    forward, torch's non-reentrant checkpoint around it (mimo.recompute). Not `gradient_checkpointing_enable` with
    `module.compile()`: transformers 5.25 checkpoints inside `forward`, so the checkpoint lands inside the compiled
    graph, where dynamo breaks on it. Without flash attention the vision attention stays out of the graphs (see the
    module docstring)."""
    from mimo.recompute import recompute_blocks

    notes = []
    if ctx.shapes.compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if vision and "flash" not in vision_attention_name(ctx):
            for block in vision:
                block.attn.forward = torch.compiler.disable(block.attn.forward)
            notes.append(f"HF vision attention ({vision_attention_name(ctx)}: a Python loop over cu_seqlens chunks) "
                         f"outside the compiled blocks")
        for block in [*layers, *vision]:
            block.forward = torch.compile(block.forward)
    if ctx.shapes.recompute:
        recompute_blocks([*layers, *vision])
    return notes


def reads_packed_positions() -> bool:
    """Whether the installed transformers' Qwen2.5-VL text model takes [4, B, T] position ids (text positions first,
    its packed-sequence masking), as transformers 5.25 does."""
    import inspect

    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    return "text_position_ids" in inspect.getsource(modeling_qwen2_5_vl.Qwen2_5_VLTextModel.forward)


def build_hf(ctx: Context, packed: bool) -> Row:
    """HF's Qwen2.5-VL in a plain loop: autocast, recomputation, compiled layers, fused AdamW, clipping."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = ctx.device
    if packed and not reads_packed_positions():
        raise RuntimeError("this transformers' Qwen2.5-VL text model does not read 4-row position_ids (text positions "
                           "first: packed sequences); run the hf row alone")
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config(ctx), attn_implementation=ctx.hf_attn,
                                                                dtype=torch.float32)
    model.train()
    inner = model.model
    notes = [f"attn={model.config._attn_implementation}", "packed rows" if packed else "padded rows"]
    notes += use_vision_attention(inner.visual, ctx)
    notes += compile_and_recompute_hf(list(inner.language_model.layers), list(inner.visual.blocks), ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=1e-8, weight_decay=0.0, fused=cuda or None)
    micro = ctx.data.hf_packed if packed else ctx.data.hf_padded
    label_tokens = ctx.data.label_tokens
    state: dict[str, Any] = {}

    def step() -> None:
        total = torch.zeros((), device=device)
        for inputs in micro:
            with _autocast(device):
                loss = model(**_to(inputs, device), num_items_in_batch=label_tokens, use_cache=False).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=cuda or None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["loss"] = total

    return Row(step, lambda: float(state["loss"]), notes)


def _vit_row(tower: nn.Module, ctx: Context, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             notes: list[str], grid_device: torch.device) -> Row:
    """Forward + backward of mean(out²) over every micro-batch's images (grids on `grid_device`: mimo's step keeps
    them on the host, HF's callers pass them with the pixels); gradients dropped after the step."""
    device = ctx.device
    state: dict[str, Any] = {}

    def step() -> None:
        total = torch.zeros((), device=device)
        for pixels, grid in ctx.data.images:
            with _autocast(device):
                out = forward(pixels.to(device, non_blocking=True), grid.to(grid_device))
            loss = out.float().square().mean()
            loss.backward()
            total += loss.detach()
        tower.zero_grad(set_to_none=True)
        state["loss"] = total

    return Row(step, lambda: float(state["loss"]), notes)


def build_vit_mimo(ctx: Context) -> Row:
    """mimo's packed Qwen2.5-VL tower alone, GEMM-aligned, compiled and recomputed as in the full row (`--set
    distributed.images.align_gemms=false`: not aligned)."""
    with torch.device(ctx.device):
        tower = Qwen25VisionTower(ctx.spec.vision)
    init_like_mimo(tower)
    notes = []
    if not any(s == "distributed.images.align_gemms=false" for s in ctx.mimo_sets):
        notes.append(f"GEMMs aligned as parallelize pads them: {align_linears(tower)[:3]}...")
    cover_tower_blocks(tower, ctx.shapes.compile, ctx.shapes.recompute)
    return _vit_row(tower, ctx, lambda p, g: tower(p, g).embeddings, notes, torch.device("cpu"))


def build_vit_hf(ctx: Context) -> Row:
    """HF's Qwen2_5_VisionTransformerPretrainedModel alone (its cu_seqlens path), compiled and recomputed."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device(ctx.device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(
            hf_config(ctx).vision_config, attn_implementation=ctx.hf_attn, dtype=torch.float32)
    tower.train()
    notes = [f"attn={tower.config._attn_implementation}", *use_vision_attention(tower, ctx),
             *compile_and_recompute_hf([], list(tower.blocks), ctx)]

    def forward(pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = tower(pixels, grid_thw=grid)
        return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 / 4

    return _vit_row(tower, ctx, forward, notes, ctx.device)


BUILDERS: dict[str, Callable[[Context], Row]] = {
    "mimo": build_mimo, "hf": lambda ctx: build_hf(ctx, packed=False), "hf+packed": lambda ctx: build_hf(ctx, True),
    "vit-mimo": build_vit_mimo, "vit-hf": build_vit_hf,
}


# -- measuring ----------------------------------------------------------------------------------------------
def nominal_peak(device: torch.device) -> float | None:
    """The card's dense bf16 TFLOP/s where known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in NOMINAL_TFLOPS.items() if k in name), None)


def run_row(name: str, ctx: Context, args: argparse.Namespace, peaks: dict[str, float | None]) -> dict[str, Any]:
    """Build a row, warm up, time `args.steps` steps; a failing row is recorded, never raised."""
    started = time.perf_counter()
    vit = name.startswith("vit")
    flops = ctx.data.flops["vision" if vit else "total"]
    record: dict[str, Any] = {"row": name, "lm_layers": None if vit else ctx.shapes.lm_layers,
                              "samples": ctx.shapes.samples, "microbatches": ctx.shapes.microbatches}
    if "hf" in name and hf_available() is None:
        return {**record, "skipped": "transformers is not installed"}
    clock, cuda = Clock(ctx.device), ctx.device.type == "cuda"
    _free(ctx.device)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)  # HF's initialization (mimo's is seeded by the run's train.seed)
        row = BUILDERS[name](ctx)
        record.update(build_s=round(time.perf_counter() - t0, 1), notes=row.notes)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            row.step()
        clock.sync()
        record["warmup_s"] = round(time.perf_counter() - t0, 1)
        times = timed_steps(row.step, clock, args.steps)
        step_ms = times[len(times) // 2]
        record.update(step_ms=step_ms, step_ms_min=times[0], step_ms_max=times[-1], loss=row.loss())
        if cuda:
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if args.profile:
            record["trace"] = trace_step(row, clock, ctx.device, step_ms, top=30)
        count = ctx.data.patches if vit else ctx.data.tokens
        record["patches_per_s" if vit else "tokens_per_s"] = count / (step_ms / 1e3)
        record["tflops"] = flops / (step_ms / 1e3) / 1e12
        record["mfu"] = record["tflops"] / peaks["measured"] if peaks["measured"] else None
        record["mfu_nominal"] = record["tflops"] / peaks["nominal"] if peaks["nominal"] else None
        del row
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
        record.update(row_error(e))
    finally:
        torch._dynamo.reset()
        _free(ctx.device)
    record["row_s"] = round(time.perf_counter() - started, 1)
    return record


def ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mimo's speed over each HF row's (tokens/s; patches/s for the ViT)."""
    done = {r["row"]: r for r in records if "step_ms" in r}
    out = []
    for mine, theirs, unit in [("mimo", "hf", "tokens_per_s"), ("mimo", "hf+packed", "tokens_per_s"),
                               ("vit-mimo", "vit-hf", "patches_per_s")]:
        if mine in done and theirs in done:
            out.append({"ratio": f"{mine} / {theirs}", "speedup": done[mine][unit] / done[theirs][unit],
                        "unit": unit, "target": 1.3 if mine == "mimo" else None})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=None, help=f"comma separated, of {list(BUILDERS)} (default: all)")
    parser.add_argument("--vit-only", action="store_true", help="the ViT rows alone (vit-mimo, vit-hf)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, uncompiled: a smoke run")
    parser.add_argument("--lm-layers", type=positive_int, default=None, help="decoder layers kept of 28 (default 8)")
    parser.add_argument("--samples", type=positive_int, default=None, help="samples (one image each) per step (16)")
    parser.add_argument("--microbatches", type=positive_int, default=None, help="micro-batches per step (4)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled blocks on both sides (default: on; off with --tiny)")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                        help="activation recomputation of every block on both sides (default: on)")
    parser.add_argument("--hf-attn", default=None, help="HF attn_implementation (default: flash_attention_2 where "
                        "flash_attn is installed, else sdpa)")
    parser.add_argument("--hf-vision-attn", default=None, help="HF's vision attention where it differs from "
                        "--hf-attn: torch-varlen (torch's varlen kernel, the one mimo's tower runs, through "
                        "transformers' AttentionInterface: HF's cu_seqlens path without flash_attn)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (2; tiny: 1)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps (4; tiny: 1)")
    parser.add_argument("--seed", type=int, default=0, help="the data's seed")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu for --tiny")
    parser.add_argument("--json", default=None, help="write every record (and the environment) to this file")
    parser.add_argument("--profile", action="store_true", help="one more step per row under torch.profiler: "
                        "kernel time, GPU busy fraction, top kernels")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="a `mimo train --set` for the mimo row (repeatable), e.g. "
                             "distributed.images.recompute_granularity=none")
    args = parser.parse_args(argv)
    base = TINY if args.tiny else Shapes()
    shapes = Shapes(**{**vars(base), **{k: v for k, v in {"lm_layers": args.lm_layers, "samples": args.samples,
                                                           "microbatches": args.microbatches}.items() if v}})
    shapes = Shapes(**{**vars(shapes), **{k: v for k, v in {"compile": args.compile,
                                                           "recompute": args.recompute}.items() if v is not None}})
    if shapes.samples % shapes.microbatches:
        parser.error(f"--samples {shapes.samples} must be a multiple of --microbatches {shapes.microbatches}")
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --tiny (CPU) or on a GPU")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    args.warmup = (1 if args.tiny else 2) if args.warmup is None else args.warmup
    args.steps = (1 if args.tiny else 4) if args.steps is None else args.steps
    rows = args.rows.split(",") if args.rows else list(VIT_ROWS if args.vit_only else FULL_ROWS + VIT_ROWS)
    unknown = [r for r in rows if r not in BUILDERS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {list(BUILDERS)}")
    hf_attn = args.hf_attn or ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")
    config = model_config(shapes)
    spec = qwen_vl_spec(config, f"preset {shapes.preset!r} with {shapes.lm_layers} decoder layers")
    data = make_data(spec, shapes, args.seed, pin=device.type == "cuda")
    env = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "transformers": hf_available(), "hf_attn": hf_attn, "hf_vision_attn": args.hf_vision_attn,
        "shapes": vars(shapes), "mimo_sets": args.sets,
        "precision": "float32 parameters, bf16 autocast" if device.type == "cuda" else "float32",
        "warmup": args.warmup, "steps": args.steps, "tokens_per_step": data.tokens, "label_tokens": data.label_tokens,
        "patches_per_step": data.patches, "images": data.batch.modality_inputs[IMAGES].item_grids.tolist(),
        "padded_positions": sum(int(d["input_ids"].numel()) for d in data.hf_padded),
        "step_tflop": {k: v / 1e12 for k, v in data.flops.items()},
    }
    peaks = {"measured": measure_peak(device, torch.bfloat16), "nominal": nominal_peak(device)}
    env["peak_tflops"] = peaks
    print("# qwen_speed " + json.dumps(env), flush=True)
    records: list[dict[str, Any]] = []
    for name in rows:
        ctx = Context(shapes, config, spec, data, device, hf_attn, hf_vision_attn=args.hf_vision_attn,
                      mimo_sets=tuple(args.sets))
        record = run_row(name, ctx=ctx, args=args, peaks=peaks)
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
        if "traceback" in record:
            print(record["traceback"], file=sys.stderr, flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            _write(args.json, env, records)
    for line in ratios(records):
        print(json.dumps(line), flush=True)
    if args.json:
        _write(args.json, env, records + ratios(records))
    if dist.is_initialized():
        dist.destroy_process_group()
    return records


def _write(path: str, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The environment and every record so far, as one JSON document."""
    with open(path, "w") as f:
        json.dump({"env": env, "records": records}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
