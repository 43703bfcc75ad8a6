"""Per-module parallel wrapping: tensor parallelism, DDP or FSDP2, mixed precision, frozen modules.

Each module a rank hosts is wrapped with its own mesh and groups (Megatron-Bridge's
`wrap_mimo_model_distributed`, with FSDP2 as well as DDP): its settings (`ModuleDistributedConfig`) are checked in
one place (`check_distributed`, which `mimo validate` reaches too), then `parallelize` applies TP, asynchronous TP,
compile, recomputation and data parallelism in that order. Gradient semantics live here in one rule:
**every data-parallel reduction is a SUM**. The loss each rank backpropagates is already divided by the
global number of label tokens (by the training step), so summing over replicas gives exactly the
gradient of the global per-token mean — whatever a module's DP size, and whether its gradient came
from its own loss or across the bridge. DDP gets a sum comm hook, FSDP2 a divide factor of 1.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

from mimo import fp8, weight_casts
from mimo.config import LANGUAGE, MimoParallelismConfig, _distinct_spans, _names, _ranks
from mimo.ddp_shards import arm_reducer, dtensor_params, local_tensor, localize, not_a_view, sum_partial_grads
from mimo.fp8 import Recipe as FP8Recipe
from mimo.fp8 import SmallLayers as FP8SmallLayers
from mimo.gemm_alignment import align_linears
from mimo.grid import ModuleGrid
from mimo.infra import MimoModelInfra
from mimo.models import MimoModel
from mimo.models.sequence_parallel import takes_sequence_parallel
from mimo.precision import DTYPES
from mimo.recompute import recompute_blocks, recomputed
from mimo.torch_compat import emulate_precision_casts

DataParallel = Literal["ddp", "fsdp"]
Recompute = Literal["none", "full"]
Reshard = Literal["default", "always", "never"]


class WrapError(ValueError):
    """A distributed config that does not fit the model."""


@dataclass
class ModuleDistributedConfig:
    """How one module is parallelized beyond its layout: data parallelism, compute dtype, compile, recomputation.

    `compute_dtype` None computes in the parameters' dtype; bfloat16/float16 compute in that dtype while
    parameters, optimizer state and gradient reduction stay in the parameters' dtype (a dtype of
    `mimo.precision.DTYPES`; a run takes it from its `PrecisionPolicy`, never from a name). A run builds this from
    its `distributed.<module>` section over `train`'s run-wide compile and recompute settings.
    """

    data_parallel: DataParallel = "ddp"  # how the module's replicas share gradients: DDP, or FSDP2's sharding
    compute_dtype: torch.dtype | None = None
    compile: bool = False  # torch.compile every block's forward (`_blocks`; in place: parameter names do not change)
    # "full": the blocks recompute their activations in the backward (`mimo.recompute`); the first
    # `recompute_num_layers` of the module's stage, all if None
    recompute_granularity: Recompute = "none"
    recompute_num_layers: int | None = None  # with "full", only the first N blocks of the stage; None: all
    # FSDP2: when a block's gathered parameters are freed (torchtitan's policy names). "always": after every
    # forward and backward (least memory; ZeRO-3). "never": gathered once a step, kept until the last
    # micro-batch's backward (ZeRO-2's communication; a full compute-dtype copy held). "default": "always" but
    # for the last block (its backward comes next), and "never" in a pipeline stage (its micro-batches interleave)
    reshard_after_forward: Reshard = "default"
    # float8 matmuls for the module's linear layers (torchao's float8 training; `pip install 'mimo[fp8]'`): none,
    # tensorwise (one scale per tensor; under fsdp the weights are all-gathered in float8) or rowwise (a scale per
    # row: more accurate, slower). Needs train.dtype bfloat16 and a GPU of compute capability 8.9+ (`mimo.fp8`)
    fp8: FP8Recipe = "none"
    # with fp8: skip (default) keeps layers whose matmul is too small to gain in the compute dtype (torchao's H100
    # thresholds, `mimo.fp8.too_small`); convert converts every linear layer whose dims are multiples of 16
    fp8_small_layers: FP8SmallLayers = "skip"
    # mixed precision: each linear layer's weight is cast once per step (to float8 for fp8 tensorwise, else to the
    # compute dtype), not in every micro-batch's forward, recomputed forward (and fp8's backward); exact, held for the
    # step (1 byte a parameter in float8, 2 in bf16; `mimo.weight_casts`). Only with whole weights (DDP or one rank,
    # TP 1): FSDP2 gathers weights per use, TP's are DTensors; fp8 rowwise casts twice (its layers not cached).
    # Off by default: LLaVA-7B stage 2 in fp8 on one H200 gained 3.5% for 9 GB more, less than fewer recomputed
    # blocks gain with that memory
    cache_weight_casts: bool = False
    fp8_emulate: bool = False  # torchao's emulated float8 matmuls on any device (CPU tests); not a run config key
    # linear layers whose width is not a multiple of 8 compute on zero-padded weights, same function (cuBLAS's fast
    # Hopper kernels need 16-byte-aligned rows: Qwen2.5-VL's 3420-wide vision MLP runs 3x faster); TP modules: off
    align_gemms: bool = True

    def check(self, where: str) -> None:
        """Each setting within its allowed values and consistent with the others; `where` names the module in the
        messages (`module 'images'`; a run config: the section the settings came from)."""
        if self.data_parallel not in get_args(DataParallel):
            raise WrapError(f"{where}: data_parallel must be 'ddp' or 'fsdp', got {self.data_parallel!r}")
        if self.reshard_after_forward not in get_args(Reshard):
            raise WrapError(f"{where}: reshard_after_forward must be 'default', 'always' or 'never', "
                            f"got {self.reshard_after_forward!r}")
        if self.reshard_after_forward != "default" and self.data_parallel != "fsdp":
            raise WrapError(f"{where}: reshard_after_forward {self.reshard_after_forward!r} applies to "
                            f"data_parallel 'fsdp' only, and it is {self.data_parallel!r} (use 'fsdp', or "
                            f"leave reshard_after_forward 'default')")
        if self.recompute_granularity not in get_args(Recompute):
            raise WrapError(f"{where}: recompute_granularity must be 'none' or 'full', "
                            f"got {self.recompute_granularity!r}")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise WrapError(f"{where}: recompute_num_layers must be at least 1 (or None: every block), "
                            f"got {self.recompute_num_layers}")
        if self.recompute_num_layers is not None and self.recompute_granularity == "none":
            raise WrapError(f"{where}: recompute_num_layers {self.recompute_num_layers} needs "
                            f"recompute_granularity 'full' (it picks which blocks recompute)")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES.values():
            raise WrapError(f"{where}: compute_dtype must be one of {list(DTYPES.values())} or None, "
                            f"got {self.compute_dtype!r}")
        if self.fp8_small_layers not in get_args(FP8SmallLayers):
            raise WrapError(f"{where}: fp8_small_layers must be 'skip' or 'convert', got {self.fp8_small_layers!r}")
        try:
            fp8.check_settings(where, self.fp8, self.compute_dtype)
        except fp8.FP8Error as e:
            raise WrapError(str(e)) from None


def _module_label(name: str) -> str:
    """How a message names module `name`'s settings: `module 'images'` (the default's: `module 'default'`)."""
    return f"module {name!r}"


@dataclass
class DistributedConfig:
    """A default for every module plus per-module overrides, e.g. images 'ddp', language 'fsdp'."""

    default: ModuleDistributedConfig = field(default_factory=ModuleDistributedConfig)
    modules: dict[str, ModuleDistributedConfig] = field(default_factory=dict)

    def for_module(self, name: str) -> ModuleDistributedConfig:
        """The config of module `name` (its override, else the default)."""
        return self.modules.get(name, self.default)

    def check(self, module_names: list[str], label: Callable[[str], str] = _module_label) -> None:
        """Every override names a module of the model; every module's settings are valid (`label` names them)."""
        unknown = sorted(set(self.modules) - set(module_names))
        if unknown:
            raise WrapError(f"distributed: unknown module(s) {unknown}; modules are {module_names}")
        self.default.check(label("default"))
        for name, cfg in self.modules.items():
            cfg.check(label(name))


def check_distributed(settings: DistributedConfig, module_names: list[str], layout: MimoParallelismConfig | None,
                      backend: str | None = None, label: Callable[[str], str] = _module_label) -> None:
    """Every rule of the distributed settings, in the one place that `plan_run` (no process group yet: no
    `backend`) and the wrapper (with its backend) both reach: each module's settings, then `tp_comm_overlap`'s
    (a finalized `layout`; None on one process, which has no TP)."""
    settings.check(module_names, label)
    if layout is not None:
        check_tp_comm_overlap(layout, settings, backend)
        check_context_parallel(layout, settings)


def check_context_parallel(layout: MimoParallelismConfig, settings: DistributedConfig) -> None:
    """FSDP2 under context parallelism shards over one dp_cp dim (`data_parallel_mesh`), which cannot sit beside a
    TP dim without torch's private mesh flattening: that combination is refused (DDP runs it)."""
    for name, m in layout.module_parallelisms.items():
        if (m.context_parallel_size > 1 and m.tensor_model_parallel_size > 1
                and settings.for_module(name).data_parallel == "fsdp"):
            raise WrapError(f"module '{name}': data_parallel fsdp with context_parallel_size "
                            f"{m.context_parallel_size} and tensor_model_parallel_size "
                            f"{m.tensor_model_parallel_size} is not supported; use data_parallel ddp, or TP 1")


def check_tp_comm_overlap(layout: MimoParallelismConfig, settings: DistributedConfig,
                          backend: str | None = None) -> None:
    """Every rule of `tp_comm_overlap` (torch's asynchronous TP): a module that asks it is sequence-parallel (its
    collectives are the ones fused); sequence-parallel modules that share ranks agree (the inductor switch is
    process-wide); it is compiled (the overlap is an inductor pass); and the backend is NCCL (symmetric memory;
    known only once the process groups exist, so `backend` None skips that rule). `layout` is finalized."""
    asked = [n for n, m in layout.module_parallelisms.items() if m.tp_comm_overlap]
    for name in asked:
        if not layout.get_parallelism(name).sequence_parallel:
            raise WrapError(f"module '{name}': tp_comm_overlap overlaps sequence parallelism's all-gathers and "
                            f"reduce-scatters with the matmuls, but sequence_parallel is false; set "
                            f"sequence_parallel true (with tensor_model_parallel_size > 1) or tp_comm_overlap false")
    _check_overlap_agrees(layout)
    for name in asked:
        if not settings.for_module(name).compile:
            raise WrapError(f"module '{name}': tp_comm_overlap is a torch.compile pass over the blocks, and compile "
                            f"is off; turn compile on or tp_comm_overlap off")
        if backend is not None and backend != "nccl":
            raise WrapError(f"module '{name}': tp_comm_overlap needs CUDA GPUs (NCCL and symmetric memory), but the "
                            f"process groups' backend is {backend}; set tp_comm_overlap false")


def _check_overlap_agrees(layout: MimoParallelismConfig) -> None:
    """The sequence-parallel modules that share ranks all set tp_comm_overlap or none does (else one would be
    overlapped without asking: it is one torch.compile switch for a whole process)."""
    items = sorted(layout.module_parallelisms.items(), key=lambda kv: (kv[1].rank_offset, kv[0]))
    for names, ranks in _distinct_spans(items):
        sp = [n for n in names if layout.module_parallelisms[n].sequence_parallel]
        on = [n for n in sp if layout.module_parallelisms[n].tp_comm_overlap]
        if on and len(on) < len(sp):
            off = [n for n in sp if n not in on]
            raise WrapError(f"modules {_names(on)} and {_names(off)} share {_ranks(ranks)} and are "
                            f"sequence-parallel, but only {_names(on)} sets tp_comm_overlap: it is one "
                            f"torch.compile switch for a whole process; set it on all of them or on none")


def module_of(model: MimoModel, name: str) -> nn.Module:
    """The part of `model` that is module `name` (the language model or a modality submodule)."""
    return model.language_model if name == LANGUAGE else model.modality_submodules[name]


def set_module(model: MimoModel, name: str, module: nn.Module) -> None:
    """Put `module` in `model` as module `name` (`module_of`'s inverse): how a wrapper replaces what it wraps."""
    if name == LANGUAGE:
        model.language_model = module
    else:
        model.modality_submodules[name] = module


def wrap_ddp(model: MimoModel, name: str, grid: ModuleGrid, cfg: ModuleDistributedConfig) -> None:
    """Wrap module `name` of `model` in mimo's DDP over its grid's dp×cp group, as `apply_data_parallel` does
    when DP > 1; public so that a benchmark can measure DDP's cost over a one-rank group, which that skips."""
    set_module(model, name, _ddp(module_of(model, name), grid, cfg))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are not wrapped)."""
    return module.module if isinstance(module, DDP) else module


# -- parallelize ------------------------------------------------------------------------------------
def wrap_mimo_model_distributed(model: MimoModel, infra: MimoModelInfra, config: DistributedConfig | None = None,
                                materialize: Callable[[MimoModel], MimoModel] | None = None,
                                device: torch.device | str | None = None) -> MimoModel:
    """Megatron-Bridge's entry: the settings checked against the layout, this process's backend and the `device`
    the parameters will live on (`check_distributed`, `check_fp8_device`), then `parallelize`; a stub rank's empty
    model passes through unchanged."""
    settings = config or DistributedConfig()
    backend = dist.get_backend() if dist.is_initialized() else None
    check_distributed(settings, list(infra.module_to_grid_map) or infra.participating_modules, infra.config, backend)
    check_fp8_device(settings, infra, torch.device(device or "cpu"))
    return parallelize(model, infra, settings, materialize)


def check_fp8_device(settings: DistributedConfig, infra: MimoModelInfra, device: torch.device) -> None:
    """Every hosted module that asks for fp8 has torchao and (unless emulated) computes on a GPU with float8
    matmuls, else one WrapError before any weight is made."""
    for name in hosted_grids(infra):
        cfg = settings.for_module(name)
        try:
            fp8.check_torchao(_module_label(name), cfg.fp8)
            if not cfg.fp8_emulate:
                fp8.check_device(_module_label(name), cfg.fp8, device)
        except fp8.FP8Error as e:
            raise WrapError(str(e)) from None


def parallelize(model: MimoModel, infra: MimoModelInfra, settings: DistributedConfig,
                materialize: Callable[[MimoModel], MimoModel] | None = None) -> MimoModel:
    """Each hosted module's parallelism, in this order (torchtitan's `parallelize_llama`): fp8 conversion
    (`apply_fp8`: torchao's float8 TP styles need its layers) and tensor parallelism, on the meta model so that no
    rank ever holds a full module; `materialize` (the provider's: values for the shards, freezing), since DDP needs
    real parameters and whether a module trains; then asynchronous TP, GEMM alignment (`align_gemms`), the weight
    casts cached per step (`cache_weight_casts`), compile, recomputation (around the compiled forward) and data
    parallelism (DDP/FSDP2, autocast)."""
    converted = apply_fp8(model, infra, settings)
    apply_tensor_parallel(model, infra, converted)
    if materialize is not None:
        model = materialize(model)
    for name, grid in hosted_grids(infra).items():
        cfg, tp = settings.for_module(name), grid.size("tp")
        if grid.config.tp_comm_overlap:
            overlap_tp_comms(grid)
        if cfg.align_gemms and tp == 1:
            align_linears(module_of(model, name))
        if caches_weight_casts(cfg, tp):
            weight_casts.enable(module_of(model, name), cfg.compute_dtype)
        if cfg.compile:
            compile_blocks(module_of(model, name), tp)
        if cfg.recompute_granularity == "full":
            recompute(module_of(model, name), tp, cfg.recompute_num_layers)
        apply_data_parallel(model, name, grid, cfg)
    return model


def hosted_grids(infra: MimoModelInfra) -> dict[str, ModuleGrid]:
    """The grid of every module this rank hosts, in the layout's module order (none on one process or a stub)."""
    return {name: infra.module_to_grid_map[name] for name in infra.participating_modules
            if name in infra.module_to_grid_map}


# -- fp8 -------------------------------------------------------------------------------------------
def apply_fp8(model: MimoModel, infra: MimoModelInfra, settings: DistributedConfig) -> dict[str, fp8.FP8Layers]:
    """`fp8`: each hosted module that asks has its linear layers that gain (`module_fp8_layers`) swapped for
    torchao's Float8Linear, on the meta model (names and master weights unchanged); under FSDP2, tensorwise
    weights are all-gathered in float8. Returns what each module converted."""
    done = {}
    for name, grid in hosted_grids(infra).items():
        cfg = settings.for_module(name)
        if cfg.fp8 == "none":
            continue
        module = module_of(model, name)
        done[name] = module_fp8_layers(name, module, cfg, grid.size("tp"), grid.config.sequence_parallel)
        fp8.convert(module, done[name], fsdp_all_gather=cfg.data_parallel == "fsdp", emulate=cfg.fp8_emulate,
                    pad_tokens=not aligned_tokens(name, grid))
        if cfg.fp8 == "rowwise" and cfg.compile:
            emulate_precision_casts()
    return done


def aligned_tokens(name: str, grid: ModuleGrid) -> bool:
    """Whether a module's token count per micro-batch is always a multiple of 16, as float8 matmuls need it (else
    torchao pads each matmul): the language model's rows are laid out so on a GPU (`training.loop.text_layout`),
    whole on each rank without CP; an encoder's count is its inputs' (577 patches an image for CLIP-336)."""
    return name == LANGUAGE and grid.size("cp") == 1


def caches_weight_casts(cfg: ModuleDistributedConfig, tp: int) -> bool:
    """Whether a module's weight casts are made once per step (`cache_weight_casts`, `mimo.weight_casts`, which
    picks the layers: tensorwise float8 ones, and plain linear ones that autocast casts): asked, in mixed precision,
    and on weights every rank holds whole (DDP or one rank; FSDP2's are gathered per use, TP's are DTensors)."""
    return cfg.cache_weight_casts and cfg.compute_dtype is not None and cfg.data_parallel == "ddp" and tp == 1


def caches_float8_casts(cfg: ModuleDistributedConfig, tp: int) -> bool:
    """Whether a module's float8 weight casts are made once per step: its casts are, and its recipe is tensorwise
    (rowwise casts a weight differently for the forward's and the backward's matmul: `float8_cacheable`)."""
    return caches_weight_casts(cfg, tp) and cfg.fp8 == "tensorwise"


def module_fp8_layers(name: str, module: nn.Module, cfg: ModuleDistributedConfig, tp: int,
                      sequence_parallel: bool) -> fp8.FP8Layers:
    """Which linear layers of module `name` convert to fp8 (`mimo.fp8.skip_reason` on the GEMM a rank runs under
    its TP plan): the one decision, which the `mimo train` parent prints and every rank applies."""
    plan = tp_plan_of(name, module, sequence_parallel) if tp > 1 else None
    return fp8.fp8_layers(module, cfg.fp8, cfg.fp8_small_layers, plan, tp)


# -- tensor parallelism ------------------------------------------------------------------------------
def apply_tensor_parallel(model: MimoModel, infra: MimoModelInfra,
                          fp8_layers: Mapping[str, fp8.FP8Layers] | None = None) -> None:
    """Shard every hosted module with TP > 1 over its `tp` mesh dim by the module's own `tp_plan()`
    (sequence-parallel where its layout says `sequence_parallel`; with torchao's float8 styles on the layers a
    tensorwise module converted, `fp8_layers` from `apply_fp8`: `mimo.fp8.float8_tp_plan`).

    Apply it to a meta-device model before `init_parameters`, so no rank ever holds a full module.
    """
    for name, grid in hosted_grids(infra).items():
        if grid.size("tp") == 1:
            continue
        module = module_of(model, name)
        plan = tp_plan_of(name, module, grid.config.sequence_parallel)
        check_tensor_parallel(name, module, plan, grid.size("tp"))
        layers = (fp8_layers or {}).get(name)
        if layers is not None and layers.recipe == "tensorwise":
            plan = fp8.float8_tp_plan(plan, module, layers)
        parallelize_module(module, grid.mesh["tp"], plan)


def tp_plan_of(name: str, module: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Module `name`'s TP plan, sequence-parallel where its layout asks (only then is the argument passed, so a
    user's module whose `tp_plan()` takes none works without it, and is refused with it)."""
    if not sequence_parallel:
        return module.tp_plan()
    if not takes_sequence_parallel(module):
        raise WrapError(f"module '{name}': {type(module).__name__}.tp_plan takes no sequence_parallel argument, "
                        f"so it cannot run sequence-parallel; set sequence_parallel false for '{name}'")
    try:
        return module.tp_plan(sequence_parallel=True)
    except ValueError as e:  # a modality submodule whose encoder cannot
        raise WrapError(f"module '{name}': {e}") from None


def check_tensor_parallel(name: str, module: nn.Module, plan: Mapping[str, ParallelStyle], tp: int) -> None:
    """Every sharded dim of the plan (features, vocabulary, attention heads) splits evenly over `tp` ranks."""
    for fqn, style in plan.items():
        layer = module.get_submodule(fqn)
        dim = _sharded_size(layer, style)
        if dim is not None and dim % tp:
            raise WrapError(f"module '{name}': {fqn} has {dim} {_what(layer, style)}, not divisible by "
                            f"tensor_model_parallel_size {tp}; choose a TP size that divides {dim}")
        parent = module.get_submodule(fqn.rsplit(".", 1)[0]) if "." in fqn else module
        head_dim = getattr(parent, "head_dim", None)
        if isinstance(style, ColwiseParallel) and isinstance(layer, nn.Linear) and head_dim:
            heads = layer.out_features // head_dim
            if heads % tp:
                raise WrapError(f"module '{name}': {fqn} holds {heads} attention heads, not divisible by "
                                f"tensor_model_parallel_size {tp}; choose a TP size that divides {heads}")


def _sharded_size(layer: nn.Module, style: ParallelStyle) -> int | None:
    """The size of the dim a style shards: out features (colwise), in features (rowwise), the vocabulary."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings
    if isinstance(layer, nn.Linear):
        return layer.out_features if isinstance(style, ColwiseParallel) else layer.in_features
    return None


def _what(layer: nn.Module, style: ParallelStyle) -> str:
    if isinstance(layer, nn.Embedding):
        return "vocabulary entries"
    return "output features" if isinstance(style, ColwiseParallel) else "input features"


# Compiled graphs one block's code may hold: all layers share its frame, and padded rows, packed rows (inductor
# guards the packed length on a few ranges: 2-2559, 2560-4095, ... on an H200 at 1b) and the variants of a
# micro-batch's arguments each add one. At torch's default of 8 a packed run reached it after ~70 micro-batches
# and ran the blocks eager from then on (benchmarks/DATA.md: 19 compilations there).
BLOCK_RECOMPILE_LIMIT = 32


def static_shapes(tp: int) -> bool:
    """Whether a compiled module's blocks take static shapes (each new length or item count compiles once, up to
    the recompile limit): TP's do, since torch's dynamic-shape recompile of a DTensor block recurses without end
    (RecursionError, torch 2.13). The text layout rounds padded widths for them (`loop.text_layout`)."""
    return tp > 1


def overlap_tp_comms(grid: ModuleGrid) -> None:
    """`tp_comm_overlap`: torch's asynchronous TP (as torchtitan enables it). Inductor's micro-pipeline pass
    splits each compiled block's sequence-parallel all-gather + matmul and matmul + reduce-scatter into chunks
    that overlap, through symmetric memory over the TP group: NCCL on CUDA GPUs only (`check_tp_comm_overlap`).
    The inductor switch is process-wide (every TP group of the process gets it; each is enabled here)."""
    group = grid.get_group("tp")
    import torch._inductor.config as inductor
    from torch.distributed import _symmetric_memory

    inductor._micro_pipeline_tp = True
    enable = getattr(_symmetric_memory, "enable_symm_mem_for_group", None)  # automatic in newer torch
    if enable is not None:
        enable(group.group_name)


def _compile_blocks_settings() -> None:
    """Dynamo's settings for compiled blocks, in the calling thread (dynamo's config is per thread since torch
    2.12: pytorch#186537): the per-frame recompile limit raised to `BLOCK_RECOMPILE_LIMIT`
    (never lower a user's), and its DDP optimizer off. That one splits every graph compiled inside a DDP
    forward at the 25 MB bucket boundaries, so that reductions can start within it; but each block is already
    a graph of its own, whose gradients reach DDP's buckets as its backward ends. Split, a 1b step ran 1,810
    more kernels and DDP cost 39 ms a step at one rank; 18 ms without the split, 3-11 with the buckets as the
    gradients too (`_ddp`; benchmarks/ddp_overhead.py, RESULTS.md)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    torch._dynamo.config.optimize_ddp = False


_THREAD = threading.local()  # the intra-op thread count this thread's compiled blocks were set up with


def _in_any_thread(compiled: Callable[..., Any], threads: int) -> Callable[..., Any]:
    """`compiled` called in whichever thread calls it as in the one that compiled it: there, first, dynamo's
    settings (`_compile_blocks_settings`) and `threads` intra-op threads. On a GPU the autograd device thread
    recomputes blocks in the backward (`recompute`): its dynamo config is its own, and so is its thread count, on
    which every compiled frame guards ("GLOBAL_STATE changed: num_threads"); at a different count each block
    compiled twice, its recompile limit at torch's default (LLaVA-7B on an H200: 8 compilations a block, half of
    them for the count alone)."""

    @functools.wraps(compiled)
    def run(*args: Any, **kwargs: Any) -> Any:
        if getattr(_THREAD, "threads", None) != threads:
            _compile_blocks_settings()
            torch.set_num_threads(threads)
            _THREAD.threads = threads
        return compiled(*args, **kwargs)

    return run


def compile_blocks(module: nn.Module, tp: int) -> None:
    """`compile`: torch.compile every block's forward (`_blocks`) in place (parameter names do not change), with
    static shapes under TP (`static_shapes`), called in any thread as in this one (`_in_any_thread`)."""
    _compile_blocks_settings()
    dynamic = False if static_shapes(tp) else None
    threads = torch.get_num_threads()
    for block in _blocks(module):
        block.forward = _in_any_thread(torch.compile(block.forward, dynamic=dynamic), threads)


def recompute(module: nn.Module, tp: int, num_layers: int | None) -> None:
    """`recompute_granularity: full`: the first `num_layers` blocks (all if None) recompute in the backward.

    Around the compiled forward, not inside it: torch's compiled checkpoint fails with DTensor parameters
    (AOTAutograd saves their DeviceMesh: "expected all tensors_saved_with_vc_check to be Tensors", torch 2.13). A
    TP module recomputes inside `dtensor_params`, a no-op unless DDP holds its local shards (`ddp_shards.localize`:
    DTensors only inside forward)."""
    recompute_blocks(recomputed(_blocks(module), num_layers), around=dtensor_params if tp > 1 else None)


# -- data parallelism and precision ------------------------------------------------------------------
def apply_data_parallel(model: MimoModel, name: str, grid: ModuleGrid, cfg: ModuleDistributedConfig) -> None:
    """Module `name` of `model` made data-parallel over its own DP group, FSDP2 or DDP as `cfg` says, computing
    in its compute dtype.

    `ddp` wraps only a module that trains and has a replica to talk to: a frozen module, or one alone in
    its DP group, has no gradient to reduce, and DDP's bucket copies would cost memory (a float32 copy of
    every gradient) and time for nothing. Such a module still computes in its compute dtype (autocast).
    """
    module = module_of(model, name)
    if cfg.data_parallel == "fsdp":
        _fully_shard(module, grid, cfg)
    elif reduces_by_chunk(module, grid):  # the step sums each model chunk's gradients (`ChunkGradients`)
        _autocast_forward(module, cfg)
    elif _trains(module) and grid.size("dp") * grid.size("cp") > 1:
        wrap_ddp(model, name, grid, cfg)
    else:
        _autocast_forward(module, cfg)


def _trains(module: nn.Module) -> bool:
    """Whether any of the module's parameters trains."""
    return any(p.requires_grad for p in module.parameters())


def reduces_by_chunk(module: nn.Module, grid: ModuleGrid) -> bool:
    """Whether a DDP module's gradients are summed per model chunk by the training step (`ChunkGradients`) instead
    of by torch DDP: a trained module with replicas and several model chunks per pipeline rank. One DDP reducer is
    armed once per backward for every parameter, but a rank's backwards each reach one chunk (its last only chunk
    0), so DDP would wait for gradients that never come; Megatron wraps each chunk in a DDP of its own. Here each
    chunk's gradients are summed in one all-reduce launched as the chunk's last backward ends, overlapping the
    backwards of the chunks below it: the same sum, exact."""
    return (grid.config.virtual_pipeline_model_parallel_size > 1 and not isinstance(module, FSDPModule)
            and _trains(module) and grid.size("dp") * grid.size("cp") > 1)


@dataclass
class ChunkGradients:
    """Sums model chunks' gradients over a module's dp×cp group, one asynchronous all-reduce per chunk
    (`reduces_by_chunk`); `wait` puts the sums in place. A parameter without a gradient contributes zeros, as in
    DDP, so every replica reduces the same buffer."""

    group: dist.ProcessGroup
    _pending: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = field(default_factory=list)

    def reduce(self, params: list[nn.Parameter]) -> None:
        """Start summing these parameters' gradients (their last backward of the step is done)."""
        grads = []
        for p in (p for p in params if p.requires_grad):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(local_tensor(p.grad))
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        self._pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, grads))

    def wait(self) -> None:
        """Finish every reduction started and write the sums back into the gradients."""
        for work, flat, grads in self._pending:
            work.wait()
            for g, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(piece.view_as(g))
        self._pending.clear()


def _ddp(module: nn.Module, grid: ModuleGrid, cfg: ModuleDistributedConfig) -> DDP:
    """torch DDP over the module's dp×cp group, summing (not averaging) gradients."""
    if grid.size("tp") > 1:
        localize(module)  # DDP cannot hold DTensors: `mimo.ddp_shards`
    _autocast_forward(module, cfg)
    group = grid.get_group("dp_cp")
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 knows only the old name
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        # the gradients are views of DDP's buckets: no copy into them before the all-reduce nor back after
        ddp = DDP(module, process_group=group, broadcast_buffers=False, init_sync=False,
                  gradient_as_bucket_view=True)
    ddp.register_comm_hook(group, _allreduce_sum_hook)
    return ddp


def _allreduce_sum_hook(group, bucket):  # no annotations: DDP checks them against real classes
    """DDP comm hook: all-reduce a bucket with SUM (DDP's default divides by the group size)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _fully_shard(module: nn.Module, grid: ModuleGrid, cfg: ModuleDistributedConfig) -> None:
    """FSDP2 over the module's dp mesh dim, per block and at the root, summing gradients; blocks resharded
    after forward as `cfg.reshard_after_forward` says (the root never is: FSDP2's own rule)."""
    param_dtype = next(module.parameters()).dtype
    compute = cfg.compute_dtype or param_dtype
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=param_dtype)
    mesh = data_parallel_mesh(grid)
    module.register_forward_hook(not_a_view)  # before FSDP2's own hooks, so they see its output
    blocks = _blocks(module)
    policy_of = reshard_policy(cfg.reshard_after_forward, grid.size("pp"))
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=policy_of(i, len(blocks)))
    fully_shard(module, mesh=mesh, mp_policy=policy)
    module._mimo_hold_unsharded = holds_gathered(cfg.reshard_after_forward, grid.size("pp"))  # `prepare_backward`
    units = [*blocks, module]  # blocks first, the root last
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # per unit: each has its own reduce-scatter
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo rejects PREMUL_SUM(1.0), a no-op anyway


def data_parallel_mesh(grid: ModuleGrid) -> DeviceMesh:
    """The mesh FSDP2 shards over: the dp dim, or under context parallelism one `dp_cp` dim over DP × CP (CP ranks
    are replicas of the parameters, as DP ranks). FSDP2 over dp_cp beside TP would need the two as dims of one
    mesh (torch's flattening is private), so that is refused (`check_context_parallel`)."""
    if grid.size("cp") == 1:
        return grid.mesh["dp"]
    return DeviceMesh.from_group(grid.get_group("dp_cp"), grid.mesh.device_type, mesh_dim_names=("dp_cp",))


def holds_gathered(name: Reshard, pp: int) -> bool:
    """Whether a policy keeps every block gathered from its first forward to the step's last backward."""
    return name == "never" or (name == "default" and pp > 1)


def reshard_policy(name: Reshard, pp: int) -> Callable[[int, int], bool]:
    """Whether block i of n frees its gathered parameters after forward, for a policy name and pipeline size."""
    if holds_gathered(name, pp):
        return lambda i, n: False
    if name == "always":
        return lambda i, n: True
    return lambda i, n: i < n - 1  # default: not the last block, whose backward starts right after the forward


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one and compile / recomputation wrap: every entry of a `layers`
    container (mimo's stacks) or a `blocks` one (the Qwen-VL towers, under Hugging Face's names), at any depth."""
    return [m for name, m in module.named_modules() if _BLOCK.search(name)]


_BLOCK = re.compile(r"(^|\.)(layers|blocks)\.\d+$")


def _autocast_forward(module: nn.Module, cfg: ModuleDistributedConfig) -> None:
    """Run the module's forward under autocast to `compute_dtype` (DDP's mixed precision)."""
    dtype = cfg.compute_dtype
    if dtype is None:
        return
    param = next(module.parameters())
    if dtype == param.dtype:
        return
    module.forward = torch.autocast(param.device.type, dtype=dtype)(module.forward)


# -- gradient accumulation ---------------------------------------------------------------------------
# A step runs several micro-batches, possibly all forwards before any backward (colocated encoders, a
# pipeline's warm-up). So reduction is decided per backward, not per forward: forwards never arm DDP,
# and only the last backward to reach a module reduces (as torch.distributed.pipelining does for DDP).
@contextlib.contextmanager
def no_sync_forward(module: nn.Module) -> Iterator[None]:
    """A forward that does not arm DDP's reducer (a no-op for other modules)."""
    with module.no_sync() if isinstance(module, DDP) else contextlib.nullcontext():
        yield


def prepare_backward(module: nn.Module, last: bool) -> None:
    """Before a micro-batch's backward through `module`: reduce gradients over DP only if it is the last.

    DDP: arm the reducer (`ddp_shards.arm_reducer`); FSDP2: toggle gradient sync (and, where its blocks are never
    resharded, keep them gathered until the last backward).
    """
    if isinstance(module, DDP) and last:
        arm_reducer(module)
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(last)
        if getattr(module, "_mimo_hold_unsharded", False):
            module.set_reshard_after_backward(last)


def prepare_chunk_backward(module: nn.Module, blocks: list[nn.Module], holds_ends: bool, last: bool) -> None:
    """Before a micro-batch's backward through one model chunk of an interleaved pipeline (`blocks` its blocks,
    `holds_ends` whether it uses the root's own parameters: the embedding, or the final norm and head). FSDP2: only
    that chunk's units reduce-scatter, at the chunk's last backward (one flag for the whole module would also
    scatter the other chunks' partial sums at every chunk's last backward: exact, since FSDP2 adds scattered
    gradients up, but more traffic). DDP: nothing (the step sums each chunk: `ChunkGradients`)."""
    if not isinstance(module, FSDPModule):
        return
    hold = getattr(module, "_mimo_hold_unsharded", False)
    for unit in [*blocks, *([module] if holds_ends else [])]:
        unit.set_requires_gradient_sync(last, recurse=False)
        if hold:
            unit.set_reshard_after_backward(last, recurse=False)


def align_gradients(model: MimoModel) -> None:
    """Give every gradient its parameter's placements, once per step, after every micro-batch's backward.

    DTensor's embedding backward returns a Replicate (whole-table) gradient for a vocabulary-sharded weight;
    left so, the norm would count the table once per TP rank and the optimizer would mix layouts (a local
    slice, no communication). A sequence-parallel norm's replicated weight gets a Partial gradient (each TP
    rank's tokens' share), summed here over TP: a DTensor's by redistribution (FSDP2, no wrapper), a DDP+TP local
    shard's (`ddp_shards.sum_partial_grads`, already summed over DP by DDP) in one all-reduce per TP group and dtype.
    """
    params = [p for module in wrapped_modules(model).values() for p in module.parameters()]
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)
    sum_partial_grads(params)


def wrapped_modules(model: MimoModel) -> dict[str, nn.Module]:
    """The hosted modules as they are after wrapping, by module name."""
    out = dict(model.modality_submodules.items())
    if model.language_model is not None:
        out[LANGUAGE] = model.language_model
    return out
