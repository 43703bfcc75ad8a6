"""FP8 training of a module's linear layers (`distributed.<module>.fp8`), through torchao's float8 training.

Which layers convert is decided here, once, by a stated rule (`skip_reason`) on the GEMM each rank runs, so the
`mimo train` parent (its one line of converted layers) and every rank's wrapper agree. The conversion is applied
from outside the model, first in `mimo.distributed.parallelize` on the meta model (torchtitan's order: convert,
then TP with torchao's float8 styles, compile, recomputation, DDP/FSDP2), so the parameters keep their names and
their float32 master values: optimizer state and checkpoints are those of the high-precision model, and a
checkpoint loads with fp8 on or off. torchao is imported only when a module asks for fp8 (`pip install
'mimo[fp8]'`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel

from mimo.fork_safe import cuda_present

Recipe = Literal["none", "tensorwise", "rowwise"]
SmallLayers = Literal["skip", "convert"]

EXTRA = "pip install 'mimo[fp8]'"  # what brings torchao
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later
# Linear layers that stay in the compute dtype whatever their size: the output head, whose logits feed the loss
# (torchtitan's float8 configs filter its `output` likewise); matched on the layer's own name
HIGH_PRECISION_LAYERS = ("lm_head",)
FP8_MULTIPLE = 16  # float8 matmuls need K and N to be multiples of 16 (a hardware rule)


class FP8Error(ValueError):
    """FP8 asked where it cannot run: no torchao, no float8 GPU, no mixed precision."""


# -- the rule --------------------------------------------------------------------------------------
def too_small(k: int, n: int, recipe: Recipe) -> bool:
    """Whether a GEMM of inner size K and output size N is too small for float8 to gain: the cast to float8 costs
    more than the faster matmul saves. torchao's H100 thresholds (torchtitan's `auto_filter_small_kn`, torchao's
    float8 README tables): tensorwise skips K <= 4096 with N <= 1024; rowwise skips N <= 2048, K <= 1024, and
    N <= 4096 with K <= 2048."""
    if recipe == "tensorwise":
        return k <= 4096 and n <= 1024
    return n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)


def skip_reason(name: str, k: int, n: int, recipe: Recipe, small_layers: SmallLayers) -> str | None:
    """Why linear layer `name` (whose GEMM on a rank has inner size K, output size N) stays in the compute dtype,
    or None if it converts: the output head never converts, dims that are not multiples of 16 cannot, and with
    `small_layers: skip` a GEMM too small to gain does not."""
    if name.rsplit(".", 1)[-1] in HIGH_PRECISION_LAYERS:
        return "output head"
    if k % FP8_MULTIPLE or n % FP8_MULTIPLE:
        return f"K or N not a multiple of {FP8_MULTIPLE}"
    if small_layers == "skip" and too_small(k, n, recipe):
        return "K·N too small to gain"
    return None


def rank_gemm(layer: nn.Linear, style: ParallelStyle | None, tp: int) -> tuple[int, int]:
    """(K, N) of the matmul a rank runs for `layer`: column-sharded layers split N over TP, row-sharded ones K."""
    k, n = layer.in_features, layer.out_features
    if tp > 1 and isinstance(style, ColwiseParallel):
        n //= tp
    elif tp > 1 and isinstance(style, RowwiseParallel):
        k //= tp
    return k, n


@dataclass
class FP8Layers:
    """Which linear layers of a module convert, by name, and why the others do not."""

    recipe: Recipe
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # name -> reason


def fp8_layers(module: nn.Module, recipe: Recipe, small_layers: SmallLayers = "skip",
               tp_plan: Mapping[str, ParallelStyle] | None = None, tp: int = 1) -> FP8Layers:
    """Every `nn.Linear` of `module` (a meta model costs nothing) sorted by the rule, on the GEMM shape a rank of
    TP size `tp` runs under `tp_plan`."""
    out = FP8Layers(recipe)
    if recipe == "none":
        return out
    plan = tp_plan or {}
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        reason = skip_reason(name, *rank_gemm(layer, plan.get(name), tp), recipe, small_layers)
        if reason is None:
            out.converted.append(name)
        else:
            out.kept[name] = reason
    return out


def summary(module_name: str, layers: FP8Layers, compiled: bool = True, cached: bool = False) -> str:
    """One line: the module, its recipe, the layers converted and those kept (repeated blocks' layers once, with
    their count), e.g. `fp8 language tensorwise: converted layers.*.self_attn.q_proj ×32, ...; kept lm_head (output
    head)`; whether the weights' casts are `cached` once a step (`mimo.weight_casts`); and, for a module not
    `compiled`, that its casts run unfused (torchao's float8 gains need compile)."""
    kept: dict[str, list[str]] = {}
    for name, reason in layers.kept.items():
        kept.setdefault(reason, []).append(name)
    kept_text = "; ".join(f"{_grouped(names)} ({reason})" for reason, names in kept.items())
    return (f"fp8 {module_name} {layers.recipe}: converted {len(layers.converted)} linear layers"
            f"{': ' + _grouped(layers.converted) if layers.converted else ''}"
            f"{'; kept in the compute dtype: ' + kept_text if kept_text else ''}"
            f"{'; weights cast to float8 once a step' if cached and layers.converted else ''}"
            f"{'' if compiled else '; compile is off: the float8 casts run unfused (torchao is fast only compiled)'}")


def _grouped(names: list[str]) -> str:
    """Names with their block index replaced by `*`, each pattern once with its count: `layers.*.mlp.up_proj ×32`."""
    counts: dict[str, int] = {}
    for name in names:
        pattern = _INDEX.sub(r"\1*\2", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(p if c == 1 else f"{p} ×{c}" for p, c in counts.items())


_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


# -- where it can run ------------------------------------------------------------------------------
def check_settings(where: str, recipe: Recipe, compute_dtype: torch.dtype | None) -> None:
    """The rules of the settings alone: a known recipe, and mixed precision (float8 casts from the compute dtype's
    activations; float32/float64 runs compute in the parameters' dtype). Checked when a config is parsed, so a
    run's carried config parses wherever it is read (`export-hf` needs no torchao: `check_torchao` is a run's)."""
    if recipe not in ("none", "tensorwise", "rowwise"):
        raise FP8Error(f"{where}: fp8 must be 'none', 'tensorwise' or 'rowwise', got {recipe!r}")
    if recipe == "none":
        return
    if compute_dtype is None:
        raise FP8Error(f"{where}: fp8 {recipe!r} needs mixed precision (train.dtype: bfloat16), but the run "
                       f"computes in its parameters' dtype (train.dtype float32 or float64); set train.dtype: "
                       f"bfloat16, or fp8: none")


def check_torchao(where: str, recipe: Recipe) -> None:
    """torchao is installed where a module runs fp8 (`mimo train`'s parent, and each rank's wrapper)."""
    if recipe != "none" and importlib.util.find_spec("torchao") is None:
        raise FP8Error(f"{where}: fp8 {recipe!r} needs torchao, which is not installed: {EXTRA} (torchao 0.18), "
                       f"or set fp8: none")


def check_device(where: str, recipe: Recipe, device: torch.device) -> None:
    """FP8 runs on a CUDA GPU with float8 matmuls (compute capability 8.9 or newer); refused elsewhere, before
    any work (on the CPU torchao's matmuls would run, slower than bfloat16, so nothing would be gained)."""
    if recipe == "none":
        return
    if device.type != "cuda":
        raise FP8Error(f"{where}: fp8 {recipe!r} needs a CUDA GPU with float8 matmuls (compute capability "
                       f"{_capability(MIN_CAPABILITY)} or newer: Ada, Hopper, Blackwell), and this rank computes on "
                       f"{device.type}; set fp8: none")
    found = torch.cuda.get_device_capability(device)
    if tuple(found) < MIN_CAPABILITY:
        raise FP8Error(f"{where}: fp8 {recipe!r} needs float8 matmuls (compute capability "
                       f"{_capability(MIN_CAPABILITY)} or newer: Ada, Hopper, Blackwell), and "
                       f"{torch.cuda.get_device_name(device)} has {_capability(found)}; set fp8: none")


def check_machine(where: str, recipe: Recipe) -> None:
    """Before any worker starts: this machine has a CUDA GPU (`fork_safe.cuda_present`, which leaves workers forkable);
    each rank checks its own GPU's capability (`check_device`)."""
    if recipe == "none":
        return
    if not cuda_present():
        raise FP8Error(f"{where}: fp8 {recipe!r} needs a CUDA GPU with float8 matmuls (compute capability "
                       f"{_capability(MIN_CAPABILITY)} or newer: Ada, Hopper, Blackwell), and this machine has "
                       f"none (the ranks would compute on the CPU); set fp8: none")


def _capability(cap: tuple[int, int]) -> str:
    return f"{cap[0]}.{cap[1]}"


# -- conversion ------------------------------------------------------------------------------------
def float8_config(recipe: Recipe, fsdp_all_gather: bool, emulate: bool,
                  pad_tokens: bool = False):  # -> torchao Float8LinearConfig
    """torchao's config of a recipe; tensorwise under FSDP2 all-gathers the weights in float8 (torchao's
    `enable_fsdp_float8_all_gather`, tensorwise only). `emulate`: torchao's emulated matmuls (high precision on
    float8-rounded values, any device: the CPU tests), never faster. `pad_tokens`: torchao pads each matmul's inner
    dim to a multiple of 16 (`pad_inner_dim`, a copy), for a module whose token count is not laid out so: the
    weight gradient's matmul sums over the tokens, and float8 matmuls need that count a multiple of 16."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=fsdp_all_gather and recipe == "tensorwise",
                               emulate=emulate, pad_inner_dim=pad_tokens)


def convert(module: nn.Module, layers: FP8Layers, fsdp_all_gather: bool = False, emulate: bool = False,
            pad_tokens: bool = False) -> None:
    """Swap `layers.converted` of `module` for torchao's `Float8Linear` in place (same parameter names and
    values; on the meta model, before TP); `float8_config` says what the flags do."""
    if not layers.converted:
        return
    from torchao.float8 import convert_to_float8_training

    chosen = set(layers.converted)
    convert_to_float8_training(module, module_filter_fn=lambda _m, fqn: fqn in chosen,
                               config=float8_config(layers.recipe, fsdp_all_gather, emulate, pad_tokens))


def float8_tp_plan(plan: Mapping[str, ParallelStyle], module: nn.Module, layers: FP8Layers) -> dict[str, ParallelStyle]:
    """A tensorwise module's TP plan with torchao's float8 styles (torchtitan's float8 TP): a converted layer's
    `ColwiseParallel` / `RowwiseParallel` become `Float8ColwiseParallel` / `Float8RowwiseParallel` (inputs cast to
    float8 before their all-gather), and a sublayer's `PrepareModuleInput` (sequence parallelism's all-gather)
    becomes `PrepareFloat8ModuleInput` on a sublayer made of converted linear layers only (an MLP, an attention
    without q/k norms: its input reaches nothing but float8 matmuls; never a block, whose norm takes it). Other
    styles (a fused
    or custom one, an unconverted layer's) are kept: DTensor runs a Float8Linear under them with high-precision
    communication."""
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    out, converted = dict(plan), set(layers.converted)
    for fqn, style in plan.items():
        if type(style) in (ColwiseParallel, RowwiseParallel) and fqn in converted:
            cls = Float8ColwiseParallel if type(style) is ColwiseParallel else Float8RowwiseParallel
            out[fqn] = cls(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                           use_local_output=style.use_local_output)
        elif type(style) is PrepareModuleInput and _only_converted(module, fqn, converted):
            out[fqn] = PrepareFloat8ModuleInput(
                input_layouts=style.input_layouts, desired_input_layouts=style.desired_input_layouts,
                input_kwarg_layouts=style.input_kwarg_layouts or None,
                desired_input_kwarg_layouts=style.desired_input_kwarg_layouts or None,
                use_local_output=style.use_local_output)
    return out


def _only_converted(module: nn.Module, fqn: str, converted: set[str]) -> bool:
    """Whether every submodule of `module`'s `fqn` that holds parameters is a converted layer (and there is one)."""
    owners = [f"{fqn}.{name}" if name else fqn for name, m in module.get_submodule(fqn).named_modules()
              if any(True for _ in m.parameters(recurse=False))]
    return bool(owners) and all(name in converted for name in owners)
