"""Build, on each rank, only the parts of a MIMO model that the rank hosts (names as in Megatron-Bridge).

`MimoModelProvider` turns module specs plus a `MimoParallelismConfig` into the process groups
(`build_infra`, once) and a model (`provide`): the modality submodules of the modules whose span holds
this rank, the language model's pipeline stage, or a parameter-free `MimoStubModel` on a stub rank.
Everything is built on the meta device and then materialized with layout-independent values, so each
rank holds exactly the single-process model's numbers for the parts it has.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mimo.config import LANGUAGE, MimoParallelismConfig
from mimo.data.positions import MRopePositions
from mimo.distributed import (
    DistributedConfig,
    check_tensor_parallel,
    module_of,
    tp_plan_of,
    wrap_mimo_model_distributed,
)
from mimo.grid import build_module_grids, build_p2p_groups
from mimo.infra import MimoModelInfra
from mimo.models import MimoModel, MimoStubModel, init_parameters
from mimo.models.init import ParameterSource


class ProviderError(ValueError):
    """Specs, freezing flags or layouts that do not fit together."""


@dataclass
class ModuleSpec:
    """A module to build later: a class or factory, its keyword arguments and sub-specs built first."""

    module: Callable[..., nn.Module]
    params: dict[str, Any] = field(default_factory=dict)
    submodules: dict[str, ModuleSpec] = field(default_factory=dict)

    def build(self, **extra: Any) -> nn.Module:
        """Build the submodules, then the module with them, its params and `extra` as keywords."""
        built = {name: spec.build() for name, spec in self.submodules.items()}
        return self.module(**self.params, **built, **extra)


def pipeline_layer_range(num_layers: int, pp_size: int, pp_rank: int,
                         module: str = "the language model") -> tuple[int, int]:
    """Layers [start, end) of stage `pp_rank`: as even as possible, earlier stages take the remainder."""
    if num_layers < pp_size:
        raise ProviderError(f"{module} has {num_layers} layers, fewer than its {pp_size} pipeline "
                            f"stages; use pipeline_model_parallel_size <= {num_layers}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def pipeline_chunk_ranges(num_layers: int, pp_size: int, pp_rank: int,
                          vpp_size: int = 1) -> tuple[tuple[int, int], ...]:
    """Each model chunk's layers on pipeline rank `pp_rank`: chunk c holds virtual stage c·PP + rank of the PP·VPP
    stages (`pipeline_layer_range`), so a micro-batch visits every rank once per chunk (Megatron's layout)."""
    stages = pp_size * vpp_size
    if vpp_size > 1 and num_layers < stages:
        raise ProviderError(f"the language model has {num_layers} layers, fewer than its {stages} virtual pipeline "
                            f"stages (pipeline_model_parallel_size {pp_size} x virtual_pipeline_model_parallel_size "
                            f"{vpp_size}); use PP x VPP <= {num_layers}")
    return tuple(pipeline_layer_range(num_layers, stages, c * pp_size + pp_rank) for c in range(vpp_size))


class MimoModelProvider:
    """Builds a MIMO model's process groups and, on each rank, the parts of the model that rank hosts.

    `text_positions`: how the language model numbers a share's tokens where not 0, 1, 2, ... (Qwen-VL's M-RoPE),
    for the text layouts; None here."""

    text_positions: MRopePositions | None = None

    def __init__(
        self,
        language_model_spec: ModuleSpec,
        modality_submodules_spec: Mapping[str, ModuleSpec],
        special_token_ids: Mapping[str, int],
        mimo_parallelism_config: MimoParallelismConfig | None = None,
        topology: Mapping[str, list[str]] | None = None,
        freeze_language_model: bool = False,
        freeze_modality_encoders: Mapping[str, bool] | None = None,
        freeze_modality_projections: Mapping[str, bool] | None = None,
        params_dtype: torch.dtype = torch.float32,
        seed: int = 1234,
        device: torch.device | str | None = None,
        initial_weights: ParameterSource | None = None,
    ) -> None:
        """Keep the specs and flags; check that they name the same modalities. Nothing is built yet.
        `initial_weights` (e.g. a Hugging Face checkpoint) fills the parameters it holds, each rank reading
        only its shards; the others start from their seeded values."""
        self.language_model_spec = language_model_spec
        self.modality_submodules_spec = dict(modality_submodules_spec)
        self.special_token_ids = dict(special_token_ids)
        self.mimo_parallelism_config = mimo_parallelism_config
        topology = topology or (mimo_parallelism_config and mimo_parallelism_config.topology)
        self.topology = {k: list(v) for k, v in (topology or {m: [LANGUAGE] for m in modality_submodules_spec}).items()}
        self.freeze_language_model = freeze_language_model
        self.freeze_modality_encoders = dict(freeze_modality_encoders or {})
        self.freeze_modality_projections = dict(freeze_modality_projections or {})
        self.params_dtype = params_dtype
        self.seed = seed
        self.device = device
        self.initial_weights = initial_weights
        self._infra: MimoModelInfra | None = None
        self._check_names()

    def _check_names(self) -> None:
        """Every modality has a special token; freezing flags and the layout name only known modules."""
        modalities = sorted(self.modality_submodules_spec)
        if LANGUAGE in self.modality_submodules_spec:
            raise ProviderError(f"'{LANGUAGE}' is the language model, not a modality; rename that modality")
        missing = sorted(set(modalities) - set(self.special_token_ids))
        if missing:
            raise ProviderError(f"modalities {missing} have no special_token_ids entry; give each modality a token id")
        for what, flags in (("freeze_modality_encoders", self.freeze_modality_encoders),
                            ("freeze_modality_projections", self.freeze_modality_projections)):
            unknown = sorted(set(flags) - set(modalities))
            if unknown:
                raise ProviderError(f"{what} names unknown modalities {unknown}; modalities are {modalities}")
        if self.mimo_parallelism_config is not None:
            layouts = set(self.mimo_parallelism_config.module_names)
            wanted = {LANGUAGE, *modalities}
            if layouts != wanted:
                raise ProviderError(_layout_mismatch(layouts, wanted))

    def embedding_widths(self) -> dict[str, int]:
        """Each modality's embedding rows' width where it is not the language model's hidden size (Qwen3-VL's
        DeepStack features ride beside the tokens); none here."""
        return {}

    def placed(self, layout: MimoParallelismConfig | None, device: torch.device | str | None) -> MimoModelProvider:
        """This provider for another placement: `layout` (None: one process holds the whole model) on `device`.
        The specs and flags are shared, nothing is rebuilt or read again; the weights source is copied (an
        `HFWeights` copy shares its directories but keeps its own read log)."""
        other = copy.copy(self)
        other.mimo_parallelism_config, other.device, other._infra = layout, device, None
        other.initial_weights = copy.copy(self.initial_weights)
        return other

    @property
    def language_config(self) -> Any:
        """The language model's config (its spec's `config`: a `DecoderConfig` for the built-in decoder)."""
        return self.language_model_spec.params.get("config")

    # -- process groups ---------------------------------------------------------------------------
    def build_infra(self) -> MimoModelInfra:
        """The grids and this rank's groups; built on the first call, returned as is afterwards."""
        if self._infra is None:
            self._infra = self._single_process_infra() if self.mimo_parallelism_config is None else self._infra_()
        return self._infra

    def _single_process_infra(self) -> MimoModelInfra:
        """One process holds everything: no groups."""
        return MimoModelInfra({}, [*self.modality_submodules_spec, LANGUAGE], None)

    def _infra_(self) -> MimoModelInfra:
        """Finalize the layout for this world, create every group on every rank, note what this rank hosts."""
        if not dist.is_initialized():
            raise ProviderError("a parallelism config needs torch.distributed to be initialized first "
                                "(init_process_group), or pass mimo_parallelism_config=None for one process")
        config = self._layout_with_topology()
        grids = build_module_grids(config)
        p2p = build_p2p_groups(seam=any(m.virtual_pipeline_model_parallel_size > 1
                                        for m in config.module_parallelisms.values()))
        return MimoModelInfra(grids, config.modules_on_rank(dist.get_rank()), config, p2p)

    def _layout_with_topology(self) -> MimoParallelismConfig:
        """The layout with the provider's topology: the given config when its edges agree, else a copy (the
        caller's config is never written to)."""
        config = self.mimo_parallelism_config
        edges = [(src, dst) for src, dsts in self.topology.items() for dst in dsts]
        return config if config.edges == edges else dataclasses.replace(config, topology=self.topology)

    # -- the model ------------------------------------------------------------------------------
    def check_layout(self, layout: MimoParallelismConfig) -> None:
        """Whether the model splits as `layout` asks, before any process group exists: every module's TP plan
        divides evenly (heads, KV heads, features, vocabulary: `check_tensor_parallel`, on the whole model built
        on the meta device, which costs no memory) and the language model has a layer per pipeline stage."""
        model = self.whole_meta_model()
        for name in layout.module_names:
            module_layout = layout.get_parallelism(name)
            tp = module_layout.tensor_model_parallel_size
            if tp > 1:
                module = module_of(model, name)
                check_tensor_parallel(name, module, tp_plan_of(name, module, module_layout.sequence_parallel), tp)
        language = layout.get_parallelism(LANGUAGE)
        pp, vpp = language.pipeline_model_parallel_size, language.virtual_pipeline_model_parallel_size
        if pp > 1:
            pipeline_chunk_ranges(_num_layers(self.language_model_spec), pp, 0, vpp)
        for name, spec in self.modality_submodules_spec.items():
            pp = layout.get_parallelism(name).pipeline_model_parallel_size
            if pp > 1:
                pipeline_layer_range(_encoder_layers(name, spec, pp), pp, 0, f"module '{name}': the encoder")

    def whole_meta_model(self) -> MimoModel:
        """The whole model, every module unsplit, on the meta device: its names and shapes at no memory cost."""
        with torch.device("meta"):
            return MimoModel(self.language_model_spec.build(),
                             {m: spec.build() for m, spec in self.modality_submodules_spec.items()},
                             self.special_token_ids)

    def build_meta_model(self) -> MimoModel | MimoStubModel:
        """This rank's parts on the meta device, in `params_dtype`; no memory is used for parameters."""
        infra = self.build_infra()
        if infra.is_stub_rank:
            return MimoStubModel(self.special_token_ids)
        with torch.device("meta"):
            language = self._build_language(infra) if LANGUAGE in infra.participating_modules else None
            modalities = {m: self._build_modality(m, infra)
                          for m in self.modality_submodules_spec if m in infra.participating_modules}
            model = MimoModel(language, modalities, self.special_token_ids)
        return model.to(self.params_dtype)

    def provide(self) -> MimoModel | MimoStubModel:
        """This rank's parts, materialized on `device` with layout-independent values, freezing applied."""
        return self._materialize(self.build_meta_model())

    def provide_distributed_model(self, config: DistributedConfig | None = None) -> MimoModel | MimoStubModel:
        """`provide` and wrap: build on meta, shard by TP, materialize (one full parameter at a time, then
        only this rank's shard), freeze, then DDP/FSDP2 per module."""
        return wrap_mimo_model_distributed(self.build_meta_model(), self.build_infra(), config,
                                           materialize=self._materialize, device=self.device)

    def _materialize(self, model: MimoModel) -> MimoModel:
        """Layout-independent values on `device` (one full parameter at a time, sliced to a shard), then
        freezing; an empty (stub) model has nothing to do."""
        init_parameters(model, self.seed, device=self.device or "cpu", source=self.initial_weights)
        self.apply_freezing(model)
        return model

    def _build_language(self, infra: MimoModelInfra) -> nn.Module:
        """The language model, or only the pipeline stage this rank holds (its model chunks' layers, under names
        `layers.N` with N global, whatever the PP and VPP sizes)."""
        grid = infra.module_to_grid_map.get(LANGUAGE)
        if grid is None or grid.size("pp") == 1:
            return self.language_model_spec.build()
        num_layers = _num_layers(self.language_model_spec)
        vpp = grid.config.virtual_pipeline_model_parallel_size
        ranges = pipeline_chunk_ranges(num_layers, grid.size("pp"), grid.coord.pp, vpp)
        return self.language_model_spec.build(layer_range=ranges[0] if vpp == 1 else ranges)

    def _build_modality(self, name: str, infra: MimoModelInfra) -> nn.Module:
        """A modality's encoder and projection, or under encoder pipeline parallelism this rank's stage: its
        blocks (global names `layers.N`, the front on stage 0) and, on the last stage only, the projection."""
        spec = self.modality_submodules_spec[name]
        grid = infra.module_to_grid_map.get(name)
        if grid is None or grid.size("pp") == 1:
            return spec.build()
        pp, stage = grid.size("pp"), grid.coord.pp
        layers = pipeline_layer_range(_encoder_layers(name, spec, pp), pp, stage, f"module '{name}': the encoder")
        projection = spec.submodules["projection"].build() if stage == pp - 1 else None
        return spec.module(**spec.params, encoder=spec.submodules["encoder"].build(layer_range=layers),
                           projection=projection)

    def apply_freezing(self, model: MimoModel) -> None:
        """`requires_grad=False` on the frozen language model, encoders and projections."""
        if self.freeze_language_model and model.language_model is not None:
            model.language_model.requires_grad_(False)
        for name, sub in model.modality_submodules.items():
            if self.freeze_modality_encoders.get(name, False):
                sub.encoder.requires_grad_(False)
            if self.freeze_modality_projections.get(name, False) and sub.projection is not None:
                sub.projection.requires_grad_(False)


def _layout_mismatch(layouts: set[str], wanted: set[str]) -> str:
    """What differs between the layout's module names and the model's, with the likely misspelling named."""
    extra, lacking = sorted(layouts - wanted), sorted(wanted - layouts)
    parts = [f"layouts for {extra}, which the model does not have" if extra else "",
             f"no layout for {lacking}" if lacking else ""]
    guesses = [f"{close[0]!r} for {name!r}" for name in extra
               if (close := difflib.get_close_matches(name, lacking, n=1, cutoff=0.6))]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return (f"the parallelism config has {', and '.join(p for p in parts if p)}{hint}; the model's modules are "
            f"{sorted(wanted)}: give exactly one layout per module")


def with_flag(flags: Mapping[str, bool] | None, modality: str, flag: bool) -> dict[str, bool]:
    """Per-modality freezing flags with `modality` also frozen if `flag` (unknown names kept: checked later)."""
    flags = dict(flags or {})
    flags[modality] = bool(flag or flags.get(modality, False))
    return flags


def _encoder_layers(name: str, spec: ModuleSpec, pp: int) -> int:
    """The blocks a pipelined modality's encoder runs (its config's `num_layers_built`), or a one-line refusal for an
    encoder that cannot be built by stage (no `layer_range` argument)."""
    encoder = spec.submodules.get("encoder")
    config = encoder.params.get("config") if encoder is not None else None
    takes_range = encoder is not None and "layer_range" in inspect.signature(encoder.module).parameters
    if not takes_range or not hasattr(config, "num_layers_built") or "projection" not in spec.submodules:
        what = getattr(encoder.module, "__name__", "?") if encoder is not None else "no encoder spec"
        raise ProviderError(f"module '{name}': pipeline_model_parallel_size={pp} splits an encoder's blocks into "
                            f"stages, which needs an encoder and projection spec whose encoder is built by "
                            f"layer_range= with config.num_layers_built (mimo's ViT, audio and Qwen-VL encoders); "
                            f"{what} is not; use pipeline_model_parallel_size 1")
    return config.num_layers_built


def _num_layers(spec: ModuleSpec) -> int:
    """The layer count a pipelined language model spec declares (its `config.num_layers`)."""
    config = spec.params.get("config")
    if config is None or not hasattr(config, "num_layers"):
        raise ProviderError("a pipelined language model spec needs params['config'] with num_layers, and its "
                            "module must accept layer_range=(start, end)")
    return config.num_layers
