"""fp16's dynamic loss scale, one for the whole model: every rank of the world skips or steps together.

Why not `torch.amp.GradScaler`: it finds infs per optimizer and per device and never looks past its own
rank, so with one optimizer per module (DESIGN §3 "Optimizer steps are per module") an overflow in the
encoder on rank 0 would skip only rank 0's step, and per-module scalers (Megatron-Bridge's style) drift
apart. Here the local non-finite check is all-reduced with MAX over the world group: stub ranks and ranks
of other modules take part (with their possibly empty parameter lists), so every optimizer of every
module is skipped on an overflow anywhere, and every rank's scale follows the same sequence.

Use: `scaler.scale(loss).backward()`, optionally `scaler.unscale_(params)` then clip, `scaler.step(optimizers)`,
`scaler.update()` — on every rank, every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mimo.ddp_shards import local_tensor


class GlobalGradScaler:
    """A dynamic loss scale shared by every module and rank: backoff on any overflow, growth after clean steps."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """Start at `init_scale`; `group` defaults to the world, which every rank must share."""
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(f"need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1; "
                             f"got {init_scale}, {growth_factor}, {backoff_factor}, {growth_interval}")
        self.scale_value = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.group = group
        self._clean_steps = 0
        self._unscaled = False
        self._found_inf: bool | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current scale, to backpropagate."""
        return loss * self.scale_value

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.Tensor]) -> None:
        """Divide this rank's gradients by the scale in place (once per step: call it before clipping)."""
        if self._unscaled:
            raise RuntimeError("unscale_ was already called this step; call update() after step() first")
        inv = 1.0 / self.scale_value
        for grad in _local_grads(params):
            grad.mul_(inv)
        self._unscaled = True

    @torch.no_grad()
    def found_inf(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether any rank has a non-finite gradient: this rank's check, all-reduced with MAX over `group`.

        A collective: every rank calls it, stub ranks with an empty list."""
        local = torch.nn.utils.get_total_norm(_local_grads(params), norm_type=math.inf)
        flag = (~torch.isfinite(local)).to(_flag_device(self.group), torch.float32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self._found_inf = bool(flag)
        return self._found_inf

    def step(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Unscale (unless done), then step every optimizer, or none if any rank overflowed; True if stepped."""
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        if not self._unscaled:
            self.unscale_(params)
        if self.found_inf(params):
            return False
        for opt in optimizers:
            opt.step()
        return True

    def update(self) -> None:
        """Back off on an overflow; grow after `growth_interval` clean steps in a row. Ends the step."""
        if self._found_inf is None:
            raise RuntimeError("update() needs step() (or found_inf()) first in this step")
        if self._found_inf:
            self.scale_value *= self.backoff_factor
            self._clean_steps = 0
        else:
            self._clean_steps += 1
            if self._clean_steps == self.growth_interval:
                self.scale_value *= self.growth_factor
                self._clean_steps = 0
        self._unscaled, self._found_inf = False, None

    def state_dict(self) -> dict[str, Any]:
        """The scale, its factors and the clean-step count, for checkpoints."""
        return {"scale": self.scale_value, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "clean_steps": self._clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`."""
        self.scale_value = float(state["scale"])
        self.growth_factor = state["growth_factor"]
        self.backoff_factor = state["backoff_factor"]
        self.growth_interval = state["growth_interval"]
        self._clean_steps = state["clean_steps"]


def _local_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's gradient storage: a DTensor's local shard, a plain (or DDP+TP local) tensor as is."""
    return [local_tensor(p.grad) for p in params if p.grad is not None]


def _flag_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the overflow flag is reduced: this rank's GPU for an NCCL-only group, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
