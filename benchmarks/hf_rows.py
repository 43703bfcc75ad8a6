"""The rows a user would otherwise run: Hugging Face's LLaVA in a plain PyTorch loop, alone, with DDP or FSDP2.

One rank of such a row is `hf_worker(spec)`, launched by `deployments.py` exactly as its mimo rows are, on the
same global batches of the same `SyntheticDataset`: transformers' `LlavaForConditionalGeneration` built from a
`LlavaConfig` of the preset's shapes (`llava_speed.hf_config`: CLIP ViT + Llama, SDPA attention), float32
parameters, fused AdamW (mimo's betas and eps), clipping at global norm 1.0, and
- `single` (one GPU) and `ddp`: bf16 autocast; DDP reduces once per step (`no_sync` on earlier micro-batches);
- `fsdp`: `fully_shard` per ViT and decoder layer and at the root, bf16 parameters, float32 reduction, gradient
  sync on the last micro-batch only.
Each rank trains on its DP shard of every micro-batch; the loss is the sum over the global batch's label tokens
divided by their count (`num_items_in_batch`), times the world size to undo DDP's and FSDP2's average, so the
update is mimo's. `--compile` compiles every ViT and decoder layer, as mimo's `train.compile` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from mimo.data import GlobalBatchSampler, MimoBatch
from mimo.data.packing import real_tokens
from mimo.families.llava import LLAVA
from mimo.flops import batch_flops
from mimo.models.labels import IGNORE_INDEX
from mimo.training.loop import run_in_world
from mimo.training.metrics import Clock, MetricsWriter, peak_memory_gb
from mimo.training.plan import plan_model
from mimo.training.run_config import RunConfig, parse_run_config
from mimo.training.step import StepResult

IMAGES = "images"


def image_mask_and_labels(batch: MimoBatch, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's image positions, and its labels with image positions and image targets never scored."""
    mask = batch.input_ids == image_token_id
    return mask, batch.labels.masked_fill(mask | (batch.labels == image_token_id), IGNORE_INDEX)


def hf_inputs(batch: MimoBatch, image_token_id: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """A mimo batch as LLaVA's inputs: the image id moved inside the vocabulary (its last id), labels shifted
    as HF shifts them back (position t scores labels[t + 1]), image positions never scored."""
    mask, labels = image_mask_and_labels(batch, image_token_id)
    hf_labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)
    return {"input_ids": batch.input_ids.masked_fill(mask, vocab_size - 1), "labels": hf_labels,
            "pixel_values": batch.modality_inputs[IMAGES].items}


def build_model(provider, kind: str, device: torch.device, compile_: bool,
                tuned: bool = False) -> tuple[nn.Module, list[nn.Module]]:
    """The HF model on `device`, wrapped for `kind` (single, ddp, fsdp); and its ViT + decoder layers. `tuned`
    DDP gets mimo's two settings (dynamo's DDP optimizer off, gradients as bucket views): HF at its best."""
    from llava_speed import hf_config  # benchmarks/ is on sys.path: deployments.py runs from there
    from transformers import LlavaForConditionalGeneration

    vision = provider.vision_config
    # the layers mimo builds (those up to select_layer), the last one selected: no tower layer HF would run
    # for nothing
    built = dataclasses.replace(vision, num_layers=vision.num_layers_built, select_layer=-1)
    config = hf_config(built, provider.language_config, vision.tokens_per_image)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    inner = model.model
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    layers = [*tower.encoder.layers, *inner.language_model.layers]
    if compile_:
        for layer in layers:
            layer.compile()
    if kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # LLaVA leaves the vision tower's post-layernorm out of the loss, so
        # DDP needs find_unused_parameters, as transformers' Trainer sets it by default
        if tuned:
            torch._dynamo.config.optimize_ddp = False
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                                    find_unused_parameters=True, gradient_as_bucket_view=tuned)
    elif kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        compute = torch.bfloat16 if device.type == "cuda" else torch.float32  # a CPU dry run computes in float32
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model, layers


class HfStep:
    """One optimizer step of the HF row over this rank's shard of every micro-batch."""

    def __init__(self, model: nn.Module, kind: str, microbatches: int, provider, device: torch.device) -> None:
        self.model, self.kind, self.microbatches, self.device = model, kind, microbatches, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                           fused=True)
        self.image_token_id = provider.image_token_id
        self.vocab_size = provider.language_config.vocab_size
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)

    def prepare(self, batch: MimoBatch) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """This rank's micro-batches as LLaVA's inputs (pinned on a GPU) and the global label count: host work a
        data loader does, outside the timed step, as mimo's rows get their batch pinned outside it."""
        label_tokens = batch.num_label_tokens({IMAGES: self.image_token_id})  # the global batch, on the host
        shard = batch.shard(self.rank, self.world) if self.kind != "single" else batch
        micro = [hf_inputs(shard.microbatch(m, self.microbatches), self.image_token_id, self.vocab_size)
                 for m in range(self.microbatches)]
        if self.device.type == "cuda":
            micro = [{k: v.pin_memory() for k, v in inputs.items()} for inputs in micro]
        return label_tokens, micro

    def __call__(self, prepared: tuple[int, list[dict[str, torch.Tensor]]]) -> None:
        label_tokens, micro = prepared
        self.loss_sum.zero_()
        for m, inputs in enumerate(micro):
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            last = m == self.microbatches - 1
            with self._sync(last), self._autocast():
                loss = self.model(**inputs, num_items_in_batch=label_tokens, use_cache=False).loss
            self.loss_sum += loss.detach().double() * label_tokens
            (loss * self.world).backward()  # DDP and FSDP2 average over ranks; mimo sums
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.label_tokens = label_tokens

    def _sync(self, last: bool):
        if self.kind == "ddp" and not last:
            return self.model.no_sync()
        if self.kind == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _autocast(self):
        if self.kind == "fsdp" or self.device.type != "cuda":  # FSDP2: bf16 parameters already; CPU: float32
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)


@record
def hf_worker(spec: dict[str, Any]) -> None:
    """Warm-up and timed steps of one HF row (and one profiled step if asked); rank 0 writes the row."""
    config = parse_run_config(spec["config"])
    run_in_world(config.train.timeout_s, _hf_row, spec, config)


def _hf_row(device: torch.device, spec: dict[str, Any], config: RunConfig) -> None:
    """`hf_worker`'s body, in the world `run_in_world` set up (the DDP model freed before its group)."""
    from deployments import make_dataset, slowest
    from step_profile import describe, profile_step

    rank, world = dist.get_rank(), dist.get_world_size()
    provider = plan_model(config).provider_on(device)
    dataset = make_dataset(provider, config, spec["images"], spec["seq_len"])
    sampler = GlobalBatchSampler(len(dataset), config.train.global_batch_size, config.train.seed)
    model, _ = build_model(provider, spec["hf"], device, config.train.compile, spec.get("ddp_tuned", False))
    step = HfStep(model, spec["hf"], config.train.num_microbatches, provider, device)
    writer = MetricsWriter(config.run_dir, enabled=rank == 0)
    clock = Clock(device)
    times, losses, flops = [], [], None
    for i in range(config.train.steps):
        batch = dataset.batch(next(sampler), seq_len=spec["seq_len"])
        flops = flops or batch_flops(provider, batch, LLAVA.modality_flops(provider))
        prepared = step.prepare(batch)
        clock.sync()
        t0 = time.perf_counter()
        step(prepared)
        clock.sync()
        seconds = slowest(time.perf_counter() - t0, device)
        dist.all_reduce(step.loss_sum)
        loss = float(step.loss_sum) / step.label_tokens
        losses.append(loss)
        if rank == 0:
            result = StepResult(loss=loss, label_tokens=step.label_tokens,
                                tokens=real_tokens(batch, provider.special_token_ids),
                                positions=batch.input_ids.numel(), grad_norm=float(step.grad_norm), lr=1e-4,
                                seconds={"step": seconds})
            writer.log_step(i + 1, result, flops=flops, extra={"deployment": spec["name"]})
        if i >= spec["warmup"]:
            times.append(seconds)
    profile = None
    if spec["profile"]:
        trace = Path(spec["result"]).parent / f"trace_rank{rank}.json.gz" if spec.get("trace") and rank == 0 else None
        prepared = step.prepare(dataset.batch(next(sampler), seq_len=spec["seq_len"]))
        profile = profile_step(lambda: step(prepared), trace)
        if rank == 0:
            print(f"# {spec['name']} profile, rank 0: {describe(profile)}", flush=True)
    memory: list[Any] = [None] * world
    dist.all_gather_object(memory, peak_memory_gb())
    if rank == 0:
        step_s = sum(times) / len(times)
        tokens = config.train.global_batch_size * spec["seq_len"]
        row = {"name": spec["name"], "world": world, "bridge": "-", "layouts": spec["layouts"],
               "baseline": None, "timed_steps": len(times), "tokens_per_step": tokens, "step_s": step_s,
               "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
               "tflops_per_gpu": flops / step_s / world / 1e12, "step_tflop": flops / 1e12, "losses": losses,
               "peak_memory_gb": max(memory), "deployment": f"hf-{spec['hf']}", "profile": profile,
               "microbatches": config.train.num_microbatches, "compile": config.train.compile}
        Path(spec["result"]).write_text(json.dumps(row, indent=1))
    dist.barrier()
    writer.close()
