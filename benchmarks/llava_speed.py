"""LLaVA training speed on one device: mimo's step, the same modules in a plain loop, HF transformers' LLaVA.

    PYTHONPATH=src python benchmarks/llava_speed.py --presets 1b,3b --microbatches 1b=2,3b=4 --json out.json
    python benchmarks/llava_speed.py --presets tiny --device cpu --warmup 0 --steps 1   # CPU, seconds (CI)
    # FP8 (issue 28) beside bf16 in one call; the LLaVA-1.5-7B stage-2 shapes need an H200 (AdamW at 7B: ~112 GB)
    PYTHONPATH=src python benchmarks/llava_speed.py --presets 1b --microbatches 2 --rows mimo+compile,mimo+compile+fp8
    PYTHONPATH=src python benchmarks/llava_speed.py --presets llava-1.5-7b --microbatches 16 \
        --rows mimo+stage2+recompute+compile,mimo+stage2+recompute+compile+fp8
    PYTHONPATH=src python benchmarks/llava_speed.py --presets 1b --loss-curve 200 --rows mimo+compile,mimo+compile+fp8

One process, one run, these rows per preset (`--rows`, comma separated):
- `mimo`: the real `MimoTrainer.train_step` on a world of one (a 1-rank NCCL group, gloo on CPU, in-process
  with a FileStore), layout `images` and `language` both on rank 0, built the way `mimo train` builds a run
  (`plan_model(config).provider_on(device)`, `provide_distributed_model(config.distributed_config)`, `build_trainer`);
- `plain`: mimo's built-in modules (ViTEncoder, MLPProjector, Decoder) in a plain PyTorch loop: encode →
  scatter into the text embeddings → decoder → loss → backward → clip → AdamW, no mimo machinery;
- `hf`: transformers' `LlavaForConditionalGeneration`, random init from a `LlavaConfig` (CLIPVisionConfig +
  LlamaConfig of the same shapes), SDPA attention; skipped with a note when transformers is missing.
A row name may carry levers after `+` (e.g. `plain+compile`, `mimo+noddp+chunkce`, see LEVERS) and its own
micro-batch count after `@` (`plain+sac@1`). A row with the `fp8` (or `fp8row`) lever is compared with the row of
the same name without it: the ratio of their tokens/s is printed at the end (issue 28: >= 1.0 at 1b, >= 1.2 at
LLaVA-1.5-7B's stage-2 shapes).

`--loss-curve N` trains each row N steps instead of timing it, each step on a fresh batch (`make_batch` with the
step as its seed: every row sees the same batches, and starts from the same weights), and compares each fp8 row's
curve with its counterpart's: the relative difference of their mean loss over the last 50 steps (issue 28: within
1%). The records keep every loss.

Precision policy, the same for every row: float32 parameters, gradients and AdamW state (fused AdamW on
CUDA, lr 1e-4, betas (0.9, 0.95), no weight decay, clip at global norm 1.0); forward under bf16 autocast
(mimo's `train.dtype: bfloat16`). Global batch B samples of S tokens, one image per sample, so
576 image tokens + S-576 text tokens per sample at 336 px; `--microbatches` splits B into gradient-
accumulation micro-batches (same for every row of a preset). FLOPs are `mimo.flops.batch_flops`
for all rows (what metrics.jsonl reports); MFU is against a bf16 matmul measured in the same run.
tokens/s counts every position of every sequence (B·S per step). Per-module times (encoder, projector,
language; forward + backward; `other` = the rest of the step: clipping, optimizer, host work) come from
CUDA events in module hooks, on extra steps after the timed ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hf_rows, beside us, when loaded as a module

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_rows import hf_inputs, image_mask_and_labels  # noqa: E402  (LLaVA's view of a mimo batch)
from torch import nn  # noqa: E402

from mimo.data import MimoBatch, next_token_labels  # noqa: E402
from mimo.families.llava import (
    LLAVA,  # noqa: E402
    LlavaMimoProvider,  # noqa: E402
)
from mimo.flops import batch_flops  # noqa: E402
from mimo.models import Decoder, DecoderConfig, MLPProjector, ModalityBatch, ViTConfig, ViTEncoder  # noqa: E402
from mimo.models.decoder import IGNORE_INDEX  # noqa: E402
from mimo.models.rmsnorm import RMSNorm  # noqa: E402
from mimo.training.metrics import Clock  # noqa: E402
from mimo.training.plan import plan_model  # noqa: E402

# preset -> (global batch, sequence length) of the issue; tiny is the CPU/CI size; llava-1.5-7b is its exact
# config.json, at stage 2's 2048 tokens (a micro-batch of 8 samples, as benchmarks/llava15.py's `one` row).
SHAPES = {"tiny": (4, 64), "1b": (8, 2048), "3b": (4, 2048), "7b": (4, 2048), "llava-1.5-7b": (128, 2048)}
LEVERS = {
    "compile": "torch.compile of every decoder layer and ViT block (module.compile())",
    "compileenc": "torch.compile of the whole vision encoder as one graph (mimo and plain)",
    "chunkce": "chunked fused linear+cross-entropy: no full [B·S, V] fp32 logits (Decoder.loss replaced)",
    "sac": "selective activation checkpointing of decoder layers (save matmul and attention outputs)",
    "foreach": "AdamW foreach instead of fused (plain/hf)",
    "syncs": "mimo's host syncs added to the plain loop (blocking copies, .cpu() loss, int() counts)",
    "mimoclip": "mimo's clip_grad_norm (float64 per-parameter norm) instead of torch's (plain)",
    "noddp": "mimo built without DDP on a data-parallel size of 1 (patched mimo.distributed._ddp)",
    "bucketview": "mimo's DDP with gradient_as_bucket_view=True (patched mimo.distributed.DDP)",
    "nocheck": "mimo without the per-step alignment check and its host syncs (patched _check_counts)",
    "fp8": "the language model's linear layers in float8, torchao tensorwise (distributed.language.fp8; mimo)",
    "fp8row": "the language model's linear layers in float8, torchao rowwise (distributed.language.fp8; mimo)",
    "recompute": "every block recomputes its activations in the backward (train.recompute_granularity: full; mimo)",
    "stage2": "LLaVA stage 2: the vision tower frozen (model.freeze_vision_encoder; mimo)",
}
FP8_LEVERS = {"fp8": "tensorwise", "fp8row": "rowwise"}
MIMO_ONLY = {"fp8", "fp8row", "recompute", "stage2"}  # levers that are run-config settings of the mimo row
CURVE_TAIL = 50  # --loss-curve compares the mean loss over this many last steps
LR, BETAS, CLIP = 1e-4, (0.9, 0.95), 1.0
CE_CHUNK = 4096  # tokens per chunk of the chunked cross-entropy


# -- the batch -------------------------------------------------------------------------------------------
def make_batch(preset: str, batch: int, seq_len: int, seed: int = 0) -> tuple[LlavaMimoProvider, MimoBatch]:
    """One image per sample: [bos, <image>×T, text...] of `seq_len` ids, next-token labels, random pixels."""
    provider = LlavaMimoProvider.preset(preset)
    vision, language = provider.vision_config, provider.language_config
    tokens = vision.tokens_per_image
    if seq_len < tokens + 2:
        raise SystemExit(f"--seq-len {seq_len} leaves no text after {tokens} image tokens")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, language.vocab_size - 1, (batch, seq_len), generator=gen)  # vocab-1: HF's image id
    ids[:, 0] = 1
    ids[:, 1:1 + tokens] = provider.image_token_id
    labels = torch.stack([next_token_labels(row) for row in ids])
    pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=gen)
    images = ModalityBatch(pixels, torch.ones(batch, dtype=torch.long))
    return provider, MimoBatch(ids, labels, {"images": images})


@dataclass
class DeviceBatch:
    """The batch as the plain and HF loops use it, on the device: text ids with the image positions zeroed
    (mimo: image id past the vocabulary) or set to HF's in-vocabulary image id, labels with image
    positions ignored, the image mask, pixels."""

    ids: torch.Tensor
    hf_ids: torch.Tensor
    labels: torch.Tensor
    hf_labels: torch.Tensor
    image_mask: torch.Tensor
    pixels: torch.Tensor
    label_tokens: torch.Tensor

    @classmethod
    def pinned(cls, provider: LlavaMimoProvider, batch: MimoBatch) -> DeviceBatch:
        """Host copies in pinned memory (when CUDA is there), prepared once, as a data loader would."""
        mask, labels = image_mask_and_labels(batch, provider.image_token_id)
        hf = hf_inputs(batch, provider.image_token_id, provider.language_config.vocab_size)
        out = cls(batch.input_ids.masked_fill(mask, 0), hf["input_ids"], labels, hf["labels"], mask,
                  hf["pixel_values"], (labels != IGNORE_INDEX).sum())
        if torch.cuda.is_available():
            out = cls(**{k: v.pin_memory() for k, v in vars(out).items()})
        return out

    def to(self, device: torch.device) -> DeviceBatch:
        return DeviceBatch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})

    def micro(self, m: int, num: int) -> DeviceBatch:
        n = self.ids.shape[0] // num
        sl = slice(m * n, (m + 1) * n)
        return DeviceBatch(**{k: (v[sl] if v.dim() else v) for k, v in vars(self).items()})


# -- clocks and per-module timing -------------------------------------------------------------------------
@dataclass
class ModuleParts:
    """Where a row's modules are: encoder, projector, the module whose forward starts the language part, the
    one whose forward returns the loss (and how to read the loss off its output)."""

    encoder: nn.Module
    projector: nn.Module
    language_start: nn.Module
    language_end: nn.Module
    loss_of: Callable[[Any], torch.Tensor]


class ModuleTimer:
    """Forward and backward time of encoder, projector and language from hooks (CUDA events in stream order).

    forward: each module's pre/post hooks. backward: language from the loss's gradient to the projector
    output's gradient; projector from there to its input's gradient; encoder from there to the last
    gradient accumulated into an encoder parameter.
    """

    def __init__(self, parts: ModuleParts, clock: Clock) -> None:
        self.clock, self.parts = clock, parts
        self.marks: list[tuple[str, Any]] = []
        self.handles: list[Any] = []
        mark = self._mark
        self.handles += [
            parts.encoder.register_forward_pre_hook(lambda *_: mark("enc_f0")),
            parts.encoder.register_forward_hook(lambda *_: mark("enc_f1")),
            parts.projector.register_forward_pre_hook(self._projector_pre),
            parts.projector.register_forward_hook(self._projector_post),
            parts.language_start.register_forward_pre_hook(lambda *_: mark("lang_f0")),
            parts.language_end.register_forward_hook(self._language_post),
        ]
        for p in parts.encoder.parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(lambda _: mark("enc_param")))

    def _mark(self, tag: str) -> None:
        self.marks.append((tag, self.clock.mark()))

    def _grad_hook(self, tensor: torch.Tensor, tag: str) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda g: self._mark(tag))

    def _projector_pre(self, _module, args) -> None:
        self._mark("proj_f0")
        self._grad_hook(args[0], "proj_in_grad")

    def _projector_post(self, _module, _args, out) -> None:
        self._mark("proj_f1")
        self._grad_hook(out, "proj_out_grad")

    def _language_post(self, _module, _args, out) -> None:
        self._mark("lang_f1")
        self._grad_hook(self.parts.loss_of(out), "loss_grad")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def totals_ms(self) -> dict[str, float]:
        """Summed milliseconds per module over everything marked (call after a synchronize)."""
        ms = self.clock.ms
        total = {"encoder": 0.0, "projector": 0.0, "language": 0.0}
        owner = {"enc": "encoder", "proj": "projector", "lang": "language"}
        opened: dict[str, Any] = {}
        for i, (tag, t) in enumerate(self.marks):
            kind = tag.split("_")[0]
            if tag.endswith("_f0"):
                opened[kind] = t
            elif tag.endswith("_f1") and kind in opened:
                total[owner[kind]] += ms(opened.pop(kind), t)
            elif tag == "loss_grad":
                opened["lang_b"] = t
            elif tag == "proj_out_grad" and "lang_b" in opened:
                total["language"] += ms(opened.pop("lang_b"), t)
                opened["proj_b"] = t
            elif tag == "proj_in_grad" and "proj_b" in opened:
                total["projector"] += ms(opened.pop("proj_b"), t)
                opened["enc_b"] = t
            elif tag == "enc_param" and "enc_b" in opened:
                nxt = self.marks[i + 1][0] if i + 1 < len(self.marks) else None
                if nxt != "enc_param":
                    total["encoder"] += ms(opened.pop("enc_b"), t)
        return total


# -- levers applied from outside the model ------------------------------------------------------------------
class _ChunkedLinearCE(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` over `labels`, a chunk of tokens at a time: the logits of
    one chunk exist at once; both gradients are computed in the forward and kept until the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, compute_dtype):  # noqa: ANN001 - autograd signature
        with torch.autocast(hidden.device.type, enabled=False):
            wide = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums in at least float32
            w = weight.to(compute_dtype)
            grad_h = torch.empty_like(hidden)
            grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device)
            loss = torch.zeros((), dtype=wide, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(compute_dtype)
                y = labels[start:start + chunk]
                valid = (y != IGNORE_INDEX).unsqueeze(1)
                safe = y.clamp(min=0).unsqueeze(1)
                logits = (h @ w.t()).to(wide)
                lse = torch.logsumexp(logits, dim=1, keepdim=True)
                loss += ((lse - logits.gather(1, safe)) * valid).sum()
                grad = logits.sub_(lse).exp_()  # softmax, in place
                grad.scatter_add_(1, safe, -torch.ones_like(safe, dtype=grad.dtype))
                grad = grad.mul_(valid).to(compute_dtype)
                grad_h[start:start + chunk] = (grad @ w).to(hidden.dtype)
                grad_w += grad.t() @ h
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def chunked_ce_loss(self: Decoder, hidden: torch.Tensor, labels: torch.Tensor,
                    scored_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A drop-in `Decoder.loss`: (summed cross-entropy, label count) without materializing all logits (on the
    scored positions alone where given, as `Decoder.loss`)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    rows, targets = hidden.flatten(0, 1), labels.flatten()
    if scored_positions is not None:
        rows, targets = rows.index_select(0, scored_positions), targets.index_select(0, scored_positions)
    loss = _ChunkedLinearCE.apply(rows, self.lm_head.weight, targets, CE_CHUNK, dtype)
    return loss, (labels != IGNORE_INDEX).sum()


def _sac_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)

    def policy(_ctx, op, *_args, **_kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_sac(layers: list[nn.Module]) -> None:
    """Selective activation checkpointing: keep matmul/attention outputs, recompute norms, rotary, SwiGLU."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    policy = _sac_policy()
    for layer in layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False,
                              context_fn=lambda: create_selective_checkpoint_contexts(policy), **kwargs)

        layer.forward = forward


def apply_model_levers(levers: set[str], decoder_layers: list[nn.Module], vit_blocks: list[nn.Module],
                       decoder: Decoder | None, encoder: nn.Module | None = None) -> None:
    """compile / compileenc / sac / chunkce on already built modules (any row)."""
    if "compileenc" in levers:
        if encoder is None:
            raise ValueError("compileenc is for the mimo and plain rows")
        encoder.forward = torch.compile(encoder.forward)  # not module.compile(): the timer's hooks stay eager
        vit_blocks = []
    if "sac" in levers:
        apply_sac(decoder_layers)
    if "compile" in levers:
        for m in [*decoder_layers, *vit_blocks]:
            m.compile()
    if "chunkce" in levers:
        if decoder is None:
            raise ValueError("chunkce needs mimo's Decoder (mimo and plain rows)")
        decoder.loss = types.MethodType(chunked_ce_loss, decoder)


# -- rows --------------------------------------------------------------------------------------------------
@dataclass
class Context:
    preset: str
    provider: LlavaMimoProvider
    batch: MimoBatch
    host: DeviceBatch
    microbatches: int
    device: torch.device
    dtype: torch.dtype
    clock: Clock


@dataclass
class Row:
    """A built row: one training step, its last loss, and its modules for the timer."""

    step: Callable[[], None]
    loss: Callable[[], float]
    parts: ModuleParts
    notes: list[str] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    step_on: Callable[[MimoBatch], None] | None = None  # a step on another batch (the mimo row: --loss-curve)


def _autocast(ctx: Context):
    if ctx.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=ctx.dtype)


def _adamw(params: list[nn.Parameter], ctx: Context, levers: set[str]) -> torch.optim.Optimizer:
    on_cuda = ctx.device.type == "cuda"
    if "foreach" in levers:
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, foreach=True)
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, fused=on_cuda or None)


def init_world(device: torch.device) -> None:
    """A world of one in this process: NCCL on CUDA, gloo on CPU, over a FileStore."""
    if dist.is_initialized():
        return
    if device.type != "cuda" and not os.environ.get("GLOO_SOCKET_IFNAME"):
        import socket

        names = [name for _, name in socket.if_nameindex()]
        if "lo" in names:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="llava_speed_"), "store"), 1)
    if device.type == "cuda" and device.index is None:  # NCCL's device_id needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=10), **kwargs)


@contextlib.contextmanager
def _patched_build(levers: set[str]):
    """Build-time patches of mimo.distributed for the noddp / bucketview levers (restored afterwards)."""
    import mimo.distributed as md

    saved = md._ddp, md.DDP
    try:
        if "noddp" in levers:
            def no_ddp(module, grid, cfg):
                if grid.size("dp") * grid.size("cp") > 1:
                    return saved[0](module, grid, cfg)
                md._autocast_forward(module, cfg)
                return module
            md._ddp = no_ddp
        if "bucketview" in levers:
            class BucketViewDDP(saved[1]):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, gradient_as_bucket_view=True, **kwargs)
            md.DDP = BucketViewDDP
        yield
    finally:
        md._ddp, md.DDP = saved


def build_mimo(ctx: Context, levers: set[str]) -> Row:
    """The model, trainer and step exactly as `mimo train` builds them (mimo.training.loop)."""
    from mimo.distributed import unwrap
    from mimo.training.loop import build_trainer
    from mimo.training.run_config import parse_run_config

    init_world(ctx.device)
    batch_size = ctx.batch.num_samples
    dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[ctx.dtype]
    fp8 = [FP8_LEVERS[lv] for lv in levers if lv in FP8_LEVERS]
    config = parse_run_config({
        "parallelism": {"images": {}, "language": {}},
        "model": {"preset": ctx.preset, "freeze_vision_encoder": "stage2" in levers},
        "distributed": {"language": {"fp8": fp8[0]}} if fp8 else {},
        "train": {"global_batch_size": batch_size, "num_microbatches": ctx.microbatches, "dtype": dtype,
                  "lr": LR, "clip_grad": CLIP, "weight_decay": 0.0, "steps": 10**6,
                  "recompute_granularity": "full" if "recompute" in levers else "none"},
        "data": {"name": "synthetic"},
    })
    provider = plan_model(config).provider_on(ctx.device)
    with _patched_build(levers):
        model = provider.provide_distributed_model(config.distributed_config)
    trainer = build_trainer(config, provider, model, ctx.device)
    sub = unwrap(model.modality_submodules["images"])
    lm = unwrap(model.language_model)
    apply_model_levers(levers, list(lm.layers.values()), list(sub.encoder.encoder.layers.values()), lm, sub.encoder)
    state: dict[str, Any] = {}

    # pinned once, as plain and hf get theirs and as `mimo train`'s BatchPrefetcher does (runs 1-12 pinned in the step)
    batch = ctx.batch.pin_memory() if ctx.device.type == "cuda" else ctx.batch

    def step() -> None:
        state["result"] = trainer.train_step(batch)

    def step_on(other: MimoBatch) -> None:
        state["result"] = trainer.train_step(other.pin_memory() if ctx.device.type == "cuda" else other)

    notes = [] if isinstance(model.language_model, nn.parallel.DistributedDataParallel) else ["no DDP"]
    row = Row(step, lambda: state["result"].loss,
              ModuleParts(sub.encoder, sub.projection, lm, lm, lambda out: out[0]), notes, step_on=step_on)
    import mimo.models.mimo_model as mm

    if "nocheck" in levers:
        saved_check = mm._check_counts
        mm._check_counts = lambda *args: None
        row.cleanup.append(lambda: setattr(mm, "_check_counts", saved_check))
    return row


def build_plain(ctx: Context, levers: set[str]) -> Row:
    """mimo's modules, nothing else: encode, scatter, decode, loss, backward, clip, AdamW."""
    provider = ctx.provider
    with torch.device(ctx.device):
        vit = ViTEncoder(provider.vision_config)
        h = provider.language_config.hidden_size
        projector = MLPProjector(provider.vision_config.hidden_size, h, h)
        decoder = Decoder(provider.language_config)
    modules = nn.ModuleList([vit, projector, decoder])
    init_like_mimo(modules)
    apply_model_levers(levers, list(decoder.layers.values()), list(vit.encoder.layers.values()), decoder, vit)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer = _adamw(params, ctx, levers)
    clip = _mimo_clip(vit, projector, decoder, provider) if "mimoclip" in levers else \
        (lambda: torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=ctx.device.type == "cuda" or None))
    syncs = "syncs" in levers
    state: dict[str, Any] = {}
    host_batch = ctx.batch

    def step() -> None:
        if syncs:  # as mimo: count the label tokens and agree on it (host), blocking copies per micro-batch
            tokens = int(host_batch.num_label_tokens({"images": provider.image_token_id}))
            full = DeviceBatch(**{k: v.to(ctx.device) for k, v in vars(ctx.host).items()})
            int(full.label_tokens)
            denominator = tokens
        else:
            full = ctx.host.to(ctx.device)
            denominator = full.label_tokens
        for m in range(ctx.microbatches):
            b = full.micro(m, ctx.microbatches)
            if syncs:
                b = DeviceBatch(**{k: v.cpu().to(ctx.device) for k, v in vars(b).items()})
            with _autocast(ctx):
                feats = projector(vit(b.pixels)).flatten(0, 1)
                if syncs:
                    int(b.image_mask.sum()), int(b.image_mask.sum(1).ne(feats.shape[0] // b.ids.shape[0]).sum())
                loss_sum, _ = decoder(input_ids=b.ids, embeddings_at=[(b.image_mask, feats)], labels=b.labels)
            if syncs:
                loss_sum.detach().double().cpu()
            (loss_sum / denominator).backward()
            state["loss"] = loss_sum.detach()
        norm = clip()
        if syncs:
            float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def loss() -> float:  # the last micro-batch's mean, for a sanity check only
        return float(state["loss"]) / max(1, int(ctx.host.label_tokens) / ctx.microbatches)

    return Row(step, loss, ModuleParts(vit, projector, decoder, decoder, lambda out: out[0]))


def init_like_mimo(module: nn.Module, std: float = 0.02) -> None:
    """mimo's initial distribution (mimo.models.init), drawn on the device: norms one, biases zero, the rest
    normal(0, std). Same statistics as mimo's layout-independent init, without its per-parameter CPU draw."""
    norms = (nn.LayerNorm, nn.RMSNorm, RMSNorm)
    with torch.no_grad():
        for owner in module.modules():
            for leaf, p in owner.named_parameters(recurse=False):
                if leaf.endswith("bias"):
                    p.zero_()
                elif isinstance(owner, norms):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)


def _mimo_clip(vit, projector, decoder, provider) -> Callable[[], torch.Tensor]:
    """mimo's clip_grad_norm on the plain modules (held in a MimoModel container, no groups of their own)."""
    from mimo.models import MimoModel, ModalitySubmodule
    from mimo.training.optim import clip_grad_norm

    init_world(next(vit.parameters()).device)
    container = MimoModel(decoder, {"images": ModalitySubmodule(vit, projector)},
                          {"images": provider.image_token_id})
    infra = types.SimpleNamespace(module_to_grid_map={})
    return lambda: clip_grad_norm(container, infra, CLIP)


def hf_available() -> str | None:
    """transformers' version, or None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def hf_config(vision: ViTConfig, language: DecoderConfig, tokens_per_image: int):
    """A LlavaConfig with our preset's shapes (image token: the last id of the vocabulary)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_config = CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads, num_channels=vision.num_channels,
        image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.activation,
        layer_norm_eps=vision.layer_norm_eps, attention_dropout=0.0)
    text_config = LlamaConfig(
        vocab_size=language.vocab_size, hidden_size=language.hidden_size,
        intermediate_size=language.ffn_hidden_size, num_hidden_layers=language.num_layers,
        num_attention_heads=language.num_heads, num_key_value_heads=language.num_kv_heads,
        max_position_embeddings=language.max_seq_len, rms_norm_eps=language.rms_norm_eps,
        tie_word_embeddings=language.tie_embeddings, attention_bias=False, mlp_bias=False, use_cache=False)
    return LlavaConfig(vision_config=vision_config, text_config=text_config,
                       image_token_index=language.vocab_size - 1, image_seq_length=tokens_per_image,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=vision.select_layer, multimodal_projector_bias=True,
                       tie_word_embeddings=language.tie_embeddings)


def build_hf(ctx: Context, levers: set[str]) -> Row:
    """transformers' LlavaForConditionalGeneration, same shapes, SDPA, same optimizer and precision."""
    from transformers import LlavaForConditionalGeneration

    provider = ctx.provider
    config = hf_config(provider.vision_config, provider.language_config, provider.vision_config.tokens_per_image)
    with torch.device(ctx.device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                           dtype=torch.float32)
    model.train()
    inner = model.model
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)  # CLIPVisionModel (v5) or older
    if levers & {"chunkce", "compileenc", "noddp", "bucketview", "syncs", "mimoclip"}:
        raise ValueError("the hf row takes only the compile, sac and foreach levers")
    apply_model_levers(levers, list(inner.language_model.layers), list(tower.encoder.layers), None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, ctx, levers)
    foreach = ctx.device.type == "cuda" or None
    state: dict[str, Any] = {}

    def step() -> None:
        full = ctx.host.to(ctx.device)
        for m in range(ctx.microbatches):
            b = full.micro(m, ctx.microbatches)
            with _autocast(ctx):
                loss = model(input_ids=b.hf_ids, pixel_values=b.pixels, labels=b.hf_labels,
                             num_items_in_batch=full.label_tokens, use_cache=False).loss
            loss.backward()
            state["loss"] = loss.detach()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=foreach)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def loss() -> float:
        return float(state["loss"]) * ctx.microbatches

    notes = [f"attn={model.config._attn_implementation}"]
    return Row(step, loss, ModuleParts(inner.vision_tower, inner.multi_modal_projector, inner.language_model,
                                       model, lambda out: out.loss), notes)


BUILDERS = {"mimo": build_mimo, "plain": build_plain, "hf": build_hf}


# -- measuring ----------------------------------------------------------------------------------------------
def measure_peak(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul in the compute dtype (8192 on CUDA, 512 on CPU), best of 5 runs."""
    n = 8192 if device.type == "cuda" else 512
    dtype = dtype if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    clock, reps, best = Clock(device), 10 if device.type == "cuda" else 3, 0.0
    for _ in range(3):
        a @ b
    for _ in range(5):
        clock.sync()
        t0 = clock.mark()
        for _ in range(reps):
            a @ b
        t1 = clock.mark()
        clock.sync()
        best = max(best, 2 * n**3 * reps / (clock.ms(t0, t1) / 1e3) / 1e12)
    del a, b
    return best


def trace_step(row: Row, clock: Clock, device: torch.device, step_ms: float, top: int = 18) -> dict[str, Any]:
    """One more step under torch.profiler: device time per kernel, summed. Kernel time over the (unprofiled)
    step time is how busy the GPU is; the rest is the GPU waiting for the host (launches, syncs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clock.sync()
    with profile(activities=activities) as prof:
        start = clock.mark()
        row.step()
        end = clock.mark()
        clock.sync()
    # kernels and copies; not the GPU-side ranges of record_function annotations ("Optimizer.step#AdamW.step",
    # "DistributedDataParallel.forward"), which the profiler also files under the device
    kernels = [e for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not re.match(r"^\w+\.[\w#.]+$", e.key)]

    def device_ms(e: Any) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e3

    busy = sum(device_ms(e) for e in kernels)
    rows = sorted(kernels, key=device_ms, reverse=True)[:top]
    out = {"kernel_ms": busy, "profiled_wall_ms": clock.ms(start, end), "kernels": sum(e.count for e in kernels),
           "busy_fraction_of_step": busy / step_ms if step_ms else None,
           "top": [(e.key[:110], e.count, device_ms(e)) for e in rows]}
    busy_pct = 100 * (out["busy_fraction_of_step"] or 0)
    print(f"# trace: {out['kernels']} kernels, {busy:.1f} ms of kernel time = {busy_pct:.0f}% of the {step_ms:.1f} ms "
          f"step (profiled step {out['profiled_wall_ms']:.1f} ms); top kernels:", flush=True)
    for key, count, ms in out["top"]:
        print(f"#   {ms:8.2f} ms {count:6d}x  {key}", flush=True)
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(spec: str, ctx: Context, args: argparse.Namespace, flops: int, peak: float) -> dict[str, Any]:
    """Build a row, warm up, time `args.steps` steps, then time modules on `args.profile_steps` more steps."""
    name, _, micro = spec.partition("@")  # "plain+sac@1": this row with 1 micro-batch
    if micro:
        ctx = dataclasses.replace(ctx, microbatches=int(micro))
    base, *levers = name.split("+")
    record: dict[str, Any] = {"row": spec, "preset": ctx.preset, "microbatches": ctx.microbatches}
    unknown = [lv for lv in levers if lv not in LEVERS]
    if base not in BUILDERS or unknown:
        return {**record, "error": f"unknown row {base!r} or lever(s) {unknown}; rows {list(BUILDERS)}, "
                                   f"levers {list(LEVERS)}"}
    if base != "mimo" and MIMO_ONLY & set(levers):
        return {**record, "error": f"lever(s) {sorted(MIMO_ONLY & set(levers))} are run settings of the mimo row"}
    if len(FP8_LEVERS.keys() & set(levers)) > 1:
        return {**record, "error": f"one fp8 recipe per row, got {sorted(FP8_LEVERS.keys() & set(levers))}"}
    if base == "hf" and hf_available() is None:
        return {**record, "skipped": "transformers is not installed"}
    cuda = ctx.device.type == "cuda"
    clock = ctx.clock
    _free(ctx.device)  # whatever the previous row left in reference cycles
    undo_patches: list[Callable[[], None]] = []
    try:
        t0 = time.perf_counter()
        row = BUILDERS[base](ctx, set(levers))
        undo_patches = row.cleanup
        record["build_s"] = time.perf_counter() - t0
        record["notes"] = row.notes
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if args.loss_curve:
            record.update(loss_curve(row, ctx, args.loss_curve))
            return record
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            row.step()
        clock.sync()
        record["warmup_s"] = time.perf_counter() - t0
        record["loss_first"] = row.loss() if args.warmup else None
        times = timed_steps(row.step, clock, args.steps)
        record["loss_last"] = row.loss()
        step_ms = times[len(times) // 2]
        record.update(step_ms=step_ms, step_ms_mean=sum(times) / args.steps,
                      step_ms_min=times[0], step_ms_max=times[-1])
        if cuda:
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            record["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        batch, seq = ctx.batch.input_ids.shape
        record["tokens_per_s"] = batch * seq / (step_ms / 1e3)
        record["tflops"] = flops / (step_ms / 1e3) / 1e12
        record["mfu"] = record["tflops"] / peak if peak else None
        if args.profile_steps:
            # Hooks on for profile_steps steps; only the last one counts (the first hooked step pays one-time
            # costs of the autograd thread's first CUDA events).
            timer = ModuleTimer(row.parts, clock)
            for i in range(args.profile_steps):
                if i == args.profile_steps - 1:
                    clock.sync()
                    timer.marks.clear()
                    start = clock.mark()
                row.step()
            end = clock.mark()
            clock.sync()
            per = timer.totals_ms()
            timer.remove()
            step_total = clock.ms(start, end)
            record.update({f"{k}_ms": v for k, v in per.items()})
            record["other_ms"] = step_total - sum(per.values())
            record["profiled_step_ms"] = step_total
        if spec in args.trace:
            record["trace"] = trace_step(row, clock, ctx.device, record["step_ms"])
        del row
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
        record.update(row_error(e))
    finally:
        for undo in undo_patches:
            undo()
        if "compile" in levers or "compileenc" in levers:
            torch._dynamo.reset()
        _free(ctx.device)
    return record


def timed_steps(step: Callable[[], None], clock: Clock, steps: int) -> list[float]:
    """`steps` calls of `step`, each timed on the device's clock (ms), sorted: the median is the row's step."""
    marks = [clock.mark()]
    for _ in range(steps):
        step()
        marks.append(clock.mark())
    clock.sync()
    return sorted(clock.ms(a, b) for a, b in zip(marks, marks[1:], strict=False))


def row_error(e: Exception) -> dict[str, str]:
    """What a failed row records: its error's first line ("OOM: ..." for running out of memory) and, unless it
    ran out of memory, the traceback."""
    first = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, torch.OutOfMemoryError):
        return {"error": f"OOM: {first[:200]}"}
    return {"error": f"{type(e).__name__}: {first[:300]}", "traceback": traceback.format_exc()}


def loss_curve(row: Row, ctx: Context, steps: int) -> dict[str, Any]:
    """`steps` steps of the row, step i on the batch `make_batch` draws with seed i (the same for every row): the
    losses, and the wall time."""
    if row.step_on is None:
        raise ValueError("--loss-curve runs mimo rows only (their step takes a batch)")
    batch, seq = ctx.batch.input_ids.shape
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        row.step_on(make_batch(ctx.preset, batch, seq, seed=i)[1])
        losses.append(row.loss())
    return {"losses": losses, "loss_last": losses[-1], "curve_s": time.perf_counter() - t0}


def without_fp8(spec: str) -> str:
    """The row an fp8 row is compared with: the same name without its fp8 lever."""
    name, at, micro = spec.partition("@")
    return "+".join(p for p in name.split("+") if p not in FP8_LEVERS) + at + micro


def fp8_comparisons(records: list[dict[str, Any]]) -> list[str]:
    """Each fp8 row against its counterpart (`without_fp8`) of the same preset: tokens/s ratio, or with
    --loss-curve the relative difference of their mean loss over the last CURVE_TAIL steps."""
    out = []
    for r in records:
        if r["row"] == without_fp8(r["row"]) or "error" in r:
            continue
        base = next((b for b in records if b["preset"] == r["preset"] and b["row"] == without_fp8(r["row"])
                     and "error" not in b), None)
        if base is None:
            continue
        if "losses" in r and "losses" in base:
            tail = min(CURVE_TAIL, len(r["losses"]), len(base["losses"]))
            mine, theirs = (sum(x[-tail:]) / tail for x in (r["losses"], base["losses"]))
            out.append(f"{r['preset']}: loss over the last {tail} steps, {r['row']} {mine:.4f} vs {base['row']} "
                       f"{theirs:.4f}: relative difference {abs(mine - theirs) / abs(theirs):.2%} (target <= 1%)")
        elif "tokens_per_s" in r and "tokens_per_s" in base:
            out.append(f"{r['preset']}: {r['row']} / {base['row']} tokens/s = "
                       f"{r['tokens_per_s'] / base['tokens_per_s']:.3f} (target >= 1.0 at 1b, >= 1.2 at 7B)")
    return out


# -- report -------------------------------------------------------------------------------------------------
COLUMNS = ("row", "µbatches", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "encoder ms", "projector ms",
           "language ms", "other ms", "loss")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table_line(r: dict[str, Any]) -> str:
    name = f"{r['preset']} {r['row']}"
    if "losses" in r and "error" not in r:
        cells = [name, str(r["microbatches"]), f"loss curve: {len(r['losses'])} steps in {r['curve_s']:.0f} s"] + \
            [""] * (len(COLUMNS) - 4) + [_fmt(r["loss_last"], 3)]
    elif "skipped" in r:
        cells = [name, "-", f"skipped: {r['skipped']}"] + [""] * (len(COLUMNS) - 3)
    elif "error" in r:
        cells = [name, str(r["microbatches"]), f"**{r['error']}**"] + [""] * (len(COLUMNS) - 3)
    else:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        cells = [name, str(r["microbatches"]), _fmt(r["step_ms"]), _fmt(r["tokens_per_s"], 0),
                 _fmt(r["tflops"], 1 if r["tflops"] >= 10 else 4),
                 mfu, _fmt(r.get("peak_gib"), 2), _fmt(r.get("encoder_ms")), _fmt(r.get("projector_ms")),
                 _fmt(r.get("language_ms")), _fmt(r.get("other_ms")), _fmt(r.get("loss_last"), 3)]
    return "| " + " | ".join(cells) + " |"


def table(records: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    return "\n".join([head, rule, *(table_line(r) for r in records)])


def comparisons(records: list[dict[str, Any]]) -> list[str]:
    """The issue's targets per preset, from the baseline rows."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in records):
        rows = {r["row"]: r for r in records if r["preset"] == preset and "step_ms" in r}
        mimo, plain, hf = rows.get("mimo"), rows.get("plain"), rows.get("hf")
        if mimo and hf:
            out.append(f"{preset}: mimo/HF tokens/s = {mimo['tokens_per_s'] / hf['tokens_per_s']:.3f} (target >= 1.25)")
            if mimo.get("peak_gib") and hf.get("peak_gib"):
                out.append(f"{preset}: peak memory mimo {mimo['peak_gib']:.2f} GiB vs HF {hf['peak_gib']:.2f} GiB "
                           f"(target <= HF)")
        if mimo and plain:
            tax = mimo["step_ms"] / plain["step_ms"] - 1
            out.append(f"{preset}: framework tax (mimo step / plain step - 1) = {100 * tax:+.1f}% (target <= 3%)")
        if mimo and mimo.get("mfu") is not None:
            out.append(f"{preset}: mimo MFU = {100 * mimo['mfu']:.1f}% of the measured peak (target >= 55% for 1b)")
    return out


def parse_per_preset(text: str, presets: list[str], default: int) -> dict[str, int]:
    """'2' for every preset, or '1b=2,3b=4'."""
    if not text:
        return dict.fromkeys(presets, default)
    if "=" not in text:
        return dict.fromkeys(presets, int(text))
    values = dict(item.split("=") for item in text.split(","))
    return {p: int(values.get(p, default)) for p in presets}


def write_json(path: str, env: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Every record so far, with the environment, as one JSON document."""
    with open(path, "w") as f:
        json.dump({"env": env, "records": records}, f, indent=1, default=str)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", "--preset", default=None, help="comma separated: tiny, 1b, 3b (default: "
                        "1b,3b on CUDA, tiny on CPU)")
    parser.add_argument("--rows", default="mimo,plain,hf", help=f"rows, with +levers; levers: {list(LEVERS)}")
    parser.add_argument("--batch", default="", help="global batch: N or preset=N,... (default: the issue's)")
    parser.add_argument("--seq-len", default="", help="sequence length: N or preset=N,...")
    parser.add_argument("--microbatches", default="", help="gradient-accumulation micro-batches: N or preset=N,...")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (3 on CUDA, 1 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10 on CUDA, 2 on CPU)")
    parser.add_argument("--profile-steps", type=int, default=None, help="extra steps with module timing hooks")
    parser.add_argument("--trace", default="", help="rows (as in --rows) to run one more step of under "
                        "torch.profiler: kernel time, GPU busy fraction, top kernels")
    parser.add_argument("--json", default=None, help="write every record (and the environment) to this file")
    parser.add_argument("--loss-curve", type=int, default=0, metavar="N", help="train each (mimo) row N steps on "
                        "fresh batches instead of timing it; compare each fp8 row's curve with its counterpart's")
    args = parser.parse_args(argv)
    args.trace = {t.strip() for t in args.trace.split(",") if t.strip()}
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda:
        torch.cuda.set_device(device)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.steps = max(1, (10 if cuda else 2) if args.steps is None else args.steps)
    args.profile_steps = 2 if args.profile_steps is None else args.profile_steps
    presets = (args.presets or ("1b,3b" if cuda else "tiny")).split(",")
    batches = {p: SHAPES[p][0] for p in presets} | {k: v for k, v in parse_per_preset(args.batch, presets, 0).items()
                                                     if v}
    seqs = {p: SHAPES[p][1] for p in presets} | {k: v for k, v in parse_per_preset(args.seq_len, presets, 0).items()
                                                  if v}
    micro = parse_per_preset(args.microbatches, presets, 1)
    dtype = getattr(torch, args.dtype)
    env = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "transformers": hf_available(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "dtype": f"float32 parameters, {args.dtype} autocast",
    }
    print("# llava_speed: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    peak = measure_peak(device, dtype)
    env["peak_tflops"] = peak
    print(f"# measured {'bf16' if cuda else 'fp32'} matmul peak: {peak:.1f} TFLOP/s", flush=True)
    records: list[dict[str, Any]] = []
    clock = Clock(device)
    for preset in presets:
        provider, batch = make_batch(preset, batches[preset], seqs[preset])
        flops = batch_flops(provider, batch, LLAVA.modality_flops(provider))
        ctx = Context(preset, provider, batch, DeviceBatch.pinned(provider, batch), micro[preset], device, dtype,
                      clock)
        print(f"# {preset}: batch {batches[preset]} x {seqs[preset]} tokens, {micro[preset]} micro-batch(es), "
              f"{flops / 1e12:.1f} model TFLOP per step (mimo.flops.batch_flops)", flush=True)
        for spec in args.rows.split(","):
            record = run_row(spec.strip(), ctx, args, flops, peak)
            record["step_tflop"] = flops / 1e12
            records.append(record)
            print(table_line(record), flush=True)
            if "traceback" in record:
                print(record["traceback"], file=sys.stderr, flush=True)
            if args.json:  # after every row, so a run cut short by a time limit keeps what it measured
                write_json(args.json, env, records)
    print()
    print(table(records))
    for line in comparisons(records) + fp8_comparisons(records):
        print("# " + line)
    if dist.is_initialized():
        dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
