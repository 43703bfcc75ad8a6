"""Weight casts made once per training step, not per micro-batch (`distributed.<module>.cache_weight_casts`).

torchao's `Float8Linear` casts its float32 master weight to float8 (an amax pass, then the cast) in every forward,
again in a recomputed forward and again in the backward: ~27 bytes moved per parameter per micro-batch. A plain
`nn.Linear` under autocast casts its float32 weight to the compute dtype in every forward and recomputed forward
(autocast's cache lives for one forward): ~12 bytes. The weights do not change between a step's micro-batches, so a
layer here takes its cast from a cache filled once per step (TransformerEngine's `is_first_microbatch` weight
caching is the precedent): torchao's matmul uses a float8 weight as is in the forward and the backward
(`tensor_already_casted_to_fp8`), autocast leaves a weight already in its dtype alone.

Exact (bitwise): each cast is the one the layer would make (torchao's `hp_tensor_to_float8_dynamic` with the layer's
weight cast config; autocast's `weight.to(dtype)`), made without autograd; each forward (and recomputed forward)
reads it through `CastGradient`, a node made there, which passes the gradient to the float32 parameter as the cast's
own node would (torchao's and `to`'s backward pass it through). Made in the forward, not once with the cache:
autograd runs the newest ready node first, so a node older than every micro-batch's would hold each weight's
gradient until the backward's end, a second float32 gradient per weight (RESULTS "Session 17"). Held for the step:
1 byte per float8 parameter, 2 per bf16 one. Only where one cast serves: a tensorwise float8 recipe (rowwise scales
the weight along a different dim for the backward's matmul than for the forward's), weights every rank holds whole
(one rank, DDP: `mimo.distributed.caches_weight_casts`; not FSDP2's, gathered per use, nor TP's DTensors), and for a
plain linear layer only while autocast runs in the cached dtype (else it computes as without the cache).

Who fills and drops the cache is the training step (`mimo.training.step`: as the step starts, and after its
optimizer step, when the weights change); outside a step every layer casts as it would without this module.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mimo.gemm_alignment import misaligned


class CastGradient(torch.autograd.Function):
    """The step's cached cast of `weight` (`cast`, no autograd), read by one forward; its gradient goes straight to
    `weight` (transposed back where the cast is of `weight.t()`, in `weight`'s dtype), as the cast's own node's."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, cast: torch.Tensor, transposed: bool) -> torch.Tensor:
        ctx.transposed, ctx.dtype = transposed, weight.dtype
        return cast.view_as(cast)  # an alias: a Function's output must be its own tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (grad.t() if ctx.transposed else grad).to(ctx.dtype), None, None


class CachedCast(nn.Module):
    """A linear layer whose weight's cast the step caches in `weight_cast` (None outside a step). A plain tensor
    attribute, read in the forward: compiled blocks take it as a graph input (guarded on its metadata, not its
    identity), so a new step's cache compiles nothing new."""

    weight_cast: torch.Tensor | None

    def cast_weight(self) -> None:
        """Fill `weight_cast` with the cast this layer's forward and backward would make."""
        raise NotImplementedError


class CachedCastLinear(CachedCast, nn.Linear):
    """`nn.Linear` under autocast, with its weight cast to the compute dtype (`cast_dtype`) once a step."""

    cast_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """`F.linear` on the cached weight where autocast would cast to its dtype; else on the weight itself."""
        cast, device = self.weight_cast, input.device.type
        if cast is None or not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != cast.dtype:
            return F.linear(input, self.weight, self.bias)
        return F.linear(input, CastGradient.apply(self.weight, cast, False), self.bias)

    def cast_weight(self) -> None:
        """autocast's cast of the weight, once."""
        self.weight_cast = self.weight.to(self.cast_dtype)


@functools.cache
def cached_cast_float8_linear() -> type[CachedCast]:
    """torchao's `Float8Linear` taking its float8 weight from `weight_cast` when the step filled it (else casting as
    torchao does). Built on first use: torchao is imported only where a module asks for fp8."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    class CachedCastFloat8Linear(CachedCast, Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            """torchao's forward, with the cached transposed float8 weight in place of the master weight."""
            weight_t = self.weight_cast
            if weight_t is None:
                return Float8Linear.forward(self, input)
            if torch.is_autocast_enabled():  # as Float8Linear: the output in the autocast dtype
                input = input.to(torch.get_autocast_gpu_dtype())
            weight_t = CastGradient.apply(self.weight, weight_t, True)
            output = matmul_with_hp_or_float8_args.apply(input, weight_t, self.linear_mm_config, self.config)
            if self.bias is not None:
                output = output + self.bias.to(output.dtype)
            return output

        def cast_weight(self) -> None:
            """The master weight cast as `matmul_with_hp_or_float8_args` casts it (tensorwise: the same for its
            forward and backward), once."""
            c = self.config.cast_config_weight
            self.weight_cast = hp_tensor_to_float8_dynamic(
                self.weight.t(), c.target_dtype, self.linear_mm_config, gemm_input_role=GemmInputRole.WEIGHT,
                scaling_granularity=c.scaling_granularity,
                round_scales_to_power_of_2=self.config.round_scales_to_power_of_2)

    return CachedCastFloat8Linear


def float8_cacheable(layer: nn.Module) -> bool:
    """Whether one cast of `layer`'s weight serves its forward and its backward: a torchao `Float8Linear` (torchao is
    loaded wherever one exists) casting its weight dynamically, tensorwise, the same way for both matmuls."""
    module = sys.modules.get("torchao.float8.float8_linear")
    if module is None or not isinstance(layer, module.Float8Linear):
        return False
    from torchao.float8.config import ScalingGranularity, ScalingType

    config = layer.config
    weight = config.cast_config_weight
    return (weight == config.cast_config_weight_for_grad_input and weight.scaling_type is ScalingType.DYNAMIC
            and weight.scaling_granularity is ScalingGranularity.TENSORWISE)


def autocast_cacheable(layer: nn.Module, compute_dtype: torch.dtype) -> bool:
    """Whether autocast casts `layer`'s weight per forward: a plain `nn.Linear` (not GEMM-aligned: that one computes
    on padded weights, `mimo.gemm_alignment`) whose weight is not in the compute dtype."""
    return type(layer) is nn.Linear and not misaligned(layer) and layer.weight.dtype != compute_dtype


def enable(module: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Make every linear layer of `module` whose cast can be cached a `CachedCast` (in place: same parameters,
    names and config; before compile, so the compiled blocks trace the class they run), computing in
    `compute_dtype`; the names of those made. Its weights must be plain tensors (one rank, DDP)."""
    done = []
    for name, layer in module.named_modules():
        if isinstance(layer, CachedCast) or type(getattr(layer, "weight", None)) is not nn.Parameter:
            continue
        if float8_cacheable(layer):
            layer.__class__ = cached_cast_float8_linear()
        elif autocast_cacheable(layer, compute_dtype):
            layer.__class__ = CachedCastLinear
            layer.cast_dtype = compute_dtype
        else:
            continue
        layer.weight_cast = None
        done.append(name)
    return done


def cached_layers(modules: Iterable[nn.Module]) -> list[CachedCast]:
    """Every `CachedCast` layer of `modules` (the training step's, found once when it is built)."""
    return [m for module in modules for m in module.modules() if isinstance(m, CachedCast)]


def fill(layers: Iterable[CachedCast]) -> None:
    """A step starts: each layer's weight cast once for all its micro-batches (no autograd: `CastGradient` carries
    each forward's gradient)."""
    with torch.no_grad():
        for layer in layers:
            layer.cast_weight()


def drop(layers: Iterable[CachedCast]) -> None:
    """The step's optimizer changed the weights: forget every cast."""
    for layer in layers:
        layer.weight_cast = None
