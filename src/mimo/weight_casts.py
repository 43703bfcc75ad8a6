"""Float8 weight casts made once per training step, not per micro-batch (`distributed.<module>.cache_weight_casts`).

torchao's `Float8Linear` casts its float32 master weight to float8 (an amax pass, then the cast) in every forward,
again in a recomputed forward and again in the backward: ~27 bytes moved per parameter per micro-batch. The
weights do not change between a step's micro-batches, so a converted layer here takes its cast from a cache filled
once per step (TransformerEngine's `is_first_microbatch` weight caching is the precedent), which torchao's matmul
uses as is in the forward and the backward (`tensor_already_casted_to_fp8`).

Exact (bitwise): the cast is torchao's own (`hp_tensor_to_float8_dynamic`, with the layer's weight cast config),
made in autograd: its node passes the gradient through unchanged and saves no tensor (the amax and the scale are
computed without gradient), so every micro-batch's backward reaches the parameter through it, and recomputation
re-reads the same cached tensor. Only where it holds: a tensorwise recipe (rowwise scales the weight along a
different dim for the backward's matmul than for the forward's: two casts), plain replicated weights (one GPU,
DDP); not FSDP2 (sharded weights gathered per use: torchao's float8 all-gather serves it) nor TP (DTensor weights).

Who fills and drops the cache is the training step's decision (`mimo.training.step`: at the step's start, and
after its optimizer step, when the weights change); outside an open step every layer casts as torchao does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn


class CachedCast(nn.Module):
    """What marks a layer whose float8 weight cast the step caches (`cached_cast_linear`); torchao-free, so the
    training step can find such layers without importing torchao."""

    cached_weight_t: torch.Tensor | None

    def cast_weight(self) -> None:
        """Fill `cached_weight_t` (`cached_cast_linear`)."""
        raise NotImplementedError


@functools.cache
def cached_cast_linear() -> type[CachedCast]:
    """torchao's `Float8Linear` taking its float8 weight from `cached_weight_t` when the step filled it (else
    casting as torchao does). A plain tensor attribute, read in the forward: compiled blocks take it as a graph
    input (guarded on its metadata, not its identity), so a new step's cache compiles nothing new. Built on first
    use: torchao is imported only where a module asks for fp8."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    class CachedCastFloat8Linear(CachedCast, Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            """torchao's forward, with the cached transposed float8 weight in place of the master weight."""
            weight_t = self.cached_weight_t
            if weight_t is None:
                return Float8Linear.forward(self, input)
            if torch.is_autocast_enabled():  # as Float8Linear: the output in the autocast dtype
                input = input.to(torch.get_autocast_gpu_dtype())
            output = matmul_with_hp_or_float8_args.apply(input, weight_t, self.linear_mm_config, self.config)
            if self.bias is not None:
                output = output + self.bias.to(output.dtype)
            return output

        def cast_weight(self) -> None:
            """Cast the master weight as `matmul_with_hp_or_float8_args` does (the same for its forward and
            backward, tensorwise), once, under autograd where the weight trains."""
            c = self.config.cast_config_weight
            self.cached_weight_t = hp_tensor_to_float8_dynamic(
                self.weight.t(), c.target_dtype, self.linear_mm_config, gemm_input_role=GemmInputRole.WEIGHT,
                scaling_granularity=c.scaling_granularity,
                round_scales_to_power_of_2=self.config.round_scales_to_power_of_2)

    return CachedCastFloat8Linear


def cacheable(layer: nn.Module) -> bool:
    """Whether one cast of `layer`'s weight serves its forward and its backward: a torchao `Float8Linear` casting
    its weight dynamically, tensorwise, the same way for both matmuls, on a plain tensor (not a DTensor, nor
    FSDP2's float8 all-gather weight)."""
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_linear import Float8Linear

    if not isinstance(layer, Float8Linear):
        return False
    config = layer.config
    weight = config.cast_config_weight
    return (weight == config.cast_config_weight_for_grad_input and weight.scaling_type is ScalingType.DYNAMIC
            and weight.scaling_granularity is ScalingGranularity.TENSORWISE
            and type(layer.weight) is nn.Parameter and type(layer.weight.data) is torch.Tensor)


def enable(module: nn.Module) -> list[str]:
    """Make every cacheable `Float8Linear` of `module` a `cached_cast_linear()` (in place: same parameters, names
    and config; before compile, so the compiled blocks trace the class they run); the names of those made."""
    done = []
    for name, layer in module.named_modules():
        if not isinstance(layer, CachedCast) and cacheable(layer):
            layer.__class__ = cached_cast_linear()
            layer.cached_weight_t = None
            done.append(name)
    return done


def cached_layers(modules: Iterable[nn.Module]) -> list[CachedCast]:
    """Every `CachedCast` layer of `modules` (the training step's, found once when it is built)."""
    return [m for module in modules for m in module.modules() if isinstance(m, CachedCast)]


def fill(layers: Iterable[CachedCast]) -> None:
    """A step starts: each layer's weight cast once for all its micro-batches (under grad mode: the step's graph)."""
    for layer in layers:
        layer.cast_weight()


def drop(layers: Iterable[CachedCast]) -> None:
    """The step's optimizer changed the weights: forget every cast (and the graph each held)."""
    for layer in layers:
        layer.cached_weight_t = None
