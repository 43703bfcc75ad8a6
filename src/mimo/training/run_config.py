"""The `mimo train` YAML: sections model, parallelism, distributed, train, data, checkpoint, log, eval.

Read safely, overridden with `--set section.key=value`, checked field by field: an unknown key or a value
of the wrong type is an error that names the key and what is allowed, before any process starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mimo.config import LayoutError, MimoParallelismConfig, load_yaml_text, read_yaml
from mimo.precision import PrecisionPolicy

if typing.TYPE_CHECKING:
    from mimo.distributed import DistributedConfig
    from mimo.training.checkpoint import HFPart


class RunConfigError(ValueError):
    """A training config that cannot run, naming the key and what would be valid."""


@dataclass
class ModelSection:
    """A LLaVA preset and what to freeze (LLaVA stage 1: freeze_vision_encoder and freeze_language_model).

    Or local Hugging Face directories instead of the preset: `hf` (a whole LlavaForConditionalGeneration) or
    `vision_hf` (CLIP / SigLIP) with `language_hf` (Llama / Mistral / Qwen2) and a freshly seeded projector,
    whose tower output is `vision_feature_layer` under `vision_feature_select_strategy` (LLaVA's meanings).
    """

    preset: Literal["tiny", "1b", "3b", "7b", "llava-1.5-7b"] = "tiny"  # llava-1.5-7b: that model's exact shapes
    freeze_language_model: bool = False
    freeze_vision_encoder: bool = False
    freeze_projection: bool = False
    hf: str | None = None
    vision_hf: str | None = None
    language_hf: str | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"


@dataclass
class TrainSection:
    """Steps, batch, optimizer and precision. dtype: float32 or float64 everywhere; bfloat16 / float16 compute
    with float32 parameters (float16 with one dynamic loss scale for the whole model)."""

    steps: int = field(default=100, metadata={"min": 1})
    global_batch_size: int = field(default=32, metadata={"min": 1})
    num_microbatches: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"min": 0})  # 0 trains nothing: a conversion or a speed run
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1})
    warmup_steps: int = field(default=0, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    clip_grad: float | None = field(default=1.0, metadata={"above": 0})
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    # the next three are every module's defaults; `distributed.<module>` may set its own
    compile: bool = False  # torch.compile each transformer block (GPU: ~30% faster at 1b, see benchmarks/)
    # full: each transformer block keeps only its input and runs its forward again in the backward (memory of
    # its activations for about a third more compute); recompute_num_layers: only the first N of each
    # module's stage (null: all). Checked with each module's settings (`ModuleDistributedConfig.check`)
    recompute_granularity: Literal["none", "full"] = "none"
    recompute_num_layers: int | None = None
    timeout_s: float = field(default=300.0, metadata={"above": 0})
    # stop cleanly once the run has taken this many minutes (from `mimo train`'s start): a checkpoint after the
    # step that passed it (whatever checkpoint.final says), then exit 0; `--resume` continues (a scheduler's
    # wall-time limit; Megatron's name)
    exit_duration_in_mins: float | None = field(default=None, metadata={"above": 0})
    # on SIGTERM (a scheduler's preemption notice) finish the step in flight, checkpoint it, exit; the launcher
    # gives its workers 30 s after forwarding the signal (torch elastic's grace) before it kills them
    exit_signal_handler: bool = False


@dataclass
class DataSection:
    """`llava`: a LLaVA-format file (JSON array or JSONL; LLaVA's `conversations` or the `messages` form) and
    its image folder; `digits` (built in: scikit-learn's 8×8 scans, captioned, written once as PNGs and LLaVA
    JSON to ~/.cache/mimo and read through the same dataset); `synthetic` (generated)."""

    name: Literal["digits", "synthetic", "llava"] = "digits"
    num_samples: int = field(default=4096, metadata={"min": 1})  # synthetic
    items_per_sample: list[int] = field(default_factory=lambda: [0, 1, 3], metadata={"min": 0})  # synthetic
    path: str | None = None  # llava: the JSON / JSONL file
    image_folder: str | None = None  # llava: the directory the entries' image paths are relative to
    template: Literal["chat", "plain", "vicuna_v1"] = "chat"  # llava: chat = the tokenizer's chat template
    # llava: default the language model's; a longer sample is dropped (a bad sample), never cut
    max_seq_len: int | None = field(default=None, metadata={"min": 1})
    on_bad_sample: Literal["skip", "error"] = "skip"  # skip: the next good sample takes its place, counted
    tokenizer: str | None = None  # llava: a directory with tokenizer.json; default model.hf / model.language_hf
    cache_samples: bool = False  # keep each prepared sample in memory after its first use (small datasets)
    # loader processes per rank; 0 builds batches in the training process; unset: min(8, CPUs per rank - 1)
    num_workers: int | None = field(default=None, metadata={"min": 0})
    prefetch_factor: int = field(default=2, metadata={"min": 1})  # global batches each worker keeps ready
    packing: bool = False  # each micro-batch's samples end to end in one row, attention kept per sample

    def __post_init__(self) -> None:
        """A llava dataset names its file and image folder; the built-in ones take none of its keys."""
        if self.name == "llava":
            missing = [k for k in ("path", "image_folder") if getattr(self, k) is None]
            if missing:
                raise RunConfigError(f"data: name 'llava' needs {' and '.join(f'data.{k}' for k in missing)} "
                                     f"(the LLaVA JSON / JSONL file and the folder its images are in)")
            return
        given = [k for k in ("path", "image_folder", "tokenizer") if getattr(self, k) is not None]
        given += ["template"] if self.template != "chat" else []
        if given:
            raise RunConfigError(f"data: {', '.join(f'data.{k}' for k in given)} apply to name 'llava' only, and "
                                 f"name is {self.name!r} (which brings its own files, tokenizer and template)")


@dataclass
class CheckpointSection:
    """Where and how often to checkpoint (0: only at the end); `keep` complete checkpoints.

    `pretrained_checkpoint`: a mimo checkpoint (any layout; or a run directory: its newest) whose weights a
    new run starts from, without its
    optimizer state, schedule, step or data position (Megatron-Bridge's name; LLaVA stage 2 from stage 1).
    `--resume` continues the run's own checkpoints instead. `final: false` skips the checkpoint at the end (a
    speed run: at 7B a stage-2 checkpoint is about 82 GB of weights and AdamW state).

    `save_frozen_hf_weights: false` leaves out of every checkpoint each frozen part whose weights the run reads
    from a Hugging Face directory (LLaVA stage 1 keeps only the projector: ~250 MB with its AdamW moments at 7B,
    not 28 GB); the checkpoint records the directory and a fingerprint of it, and whatever loads it reads those
    parts from its own run's directory, which must match."""

    dir: str | None = None
    interval: int = field(default=0, metadata={"min": 0})
    keep: int = field(default=2, metadata={"min": 1})
    pretrained_checkpoint: str | None = None
    final: bool = True
    save_frozen_hf_weights: bool = False


@dataclass
class LogSection:
    """The run directory (config, metrics.jsonl, checkpoints by default) and logging cadence."""

    dir: str = "runs/mimo"
    interval: int = field(default=10, metadata={"min": 1})
    tensorboard: bool = False


@dataclass
class EvalSection:
    """Held-out evaluation at the end of training (digits: caption accuracy by greedy generation)."""

    enabled: bool = True


@dataclass
class RunConfig:
    """A whole training run."""

    parallelism: dict[str, dict[str, Any]]
    model: ModelSection = field(default_factory=ModelSection)
    # module -> its `DISTRIBUTED_KEYS` (checked); built into `distributed_config` over train's defaults
    distributed: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        """Build the layout, the precision policy and every module's distributed settings once: every reader
        sees the same objects."""
        try:
            self._layout = MimoParallelismConfig.from_dict(self.parallelism)
        except LayoutError as e:
            raise RunConfigError(f"parallelism: {e}") from None
        self._precision = PrecisionPolicy.from_name(self.train.dtype)
        self._distributed = distributed_settings(self.distributed, self.train, self._precision)
        _check_distributed(self, world_size=None)
        if not self.checkpoint.final and self.eval.enabled and self.data.name == "digits":
            raise RunConfigError("checkpoint.final: false leaves no checkpoint for the held-out evaluation of the "
                                 "digits; set eval.enabled: false, or keep checkpoint.final: true")

    @property
    def layout(self) -> MimoParallelismConfig:
        """The parallelism section as a `MimoParallelismConfig`, built once (finalized by `validate_run`)."""
        return self._layout

    @property
    def precision(self) -> PrecisionPolicy:
        """Parameter dtype, compute dtype and loss scaling, decided once from `train.dtype`."""
        return self._precision

    @property
    def distributed_config(self) -> DistributedConfig:
        """Every module's distributed settings (`mimo.distributed`), built once from `distributed` and `train`."""
        return self._distributed

    @property
    def world_size(self) -> int:
        """The world the layout needs: the end of its last span."""
        try:
            return self.layout.total_world_size
        except LayoutError as e:
            raise RunConfigError(f"parallelism: {e} (--nproc-per-node N)") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.log.dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form (what `run_dir/config.yaml` holds)."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}
# The keys of a `distributed.<module>` section: `ModuleDistributedConfig`'s fields but the compute dtype (the
# run's, from train.dtype); compile and the recompute pair override train's for that module
DISTRIBUTED_KEYS = ("data_parallel", "reshard_after_forward", "compile", "recompute_granularity",
                    "recompute_num_layers")


def distributed_settings(sections: dict[str, dict[str, Any]], train: TrainSection,
                         precision: PrecisionPolicy) -> DistributedConfig:
    """Each module's `ModuleDistributedConfig`: its `distributed.<module>` keys over train's compile and recompute
    settings (recompute_num_layers comes from the section that sets recompute_granularity), computing in the
    run's compute dtype where it is mixed (else None: the parameters' own); modules not named take the default."""
    from mimo.distributed import DistributedConfig, ModuleDistributedConfig

    run_wide = {"compile": train.compile, "recompute_granularity": train.recompute_granularity,
                "recompute_num_layers": train.recompute_num_layers}
    compute = precision.compute_dtype if precision.mixed else None

    def settings(section: dict[str, Any]) -> ModuleDistributedConfig:
        own_pair = "recompute_granularity" in section
        inherited = {k: v for k, v in run_wide.items() if not (own_pair and k == "recompute_num_layers")}
        return ModuleDistributedConfig(**{**inherited, **section}, compute_dtype=compute)

    return DistributedConfig(settings({}), {m: settings(section) for m, section in sections.items()})


def check_data_available(config: RunConfig) -> None:
    """The run's data can be loaded here (digits: scikit-learn, which ships the scans, is installed)."""
    if config.data.name == "digits" and importlib.util.find_spec("sklearn") is None:
        raise RunConfigError("data.name 'digits' reads scikit-learn's bundled scans, but scikit-learn is not "
                             "installed: pip install scikit-learn (or use data.name synthetic)")


def hf_model(section: ModelSection):
    """The Hugging Face model the section names (`mimo.hf.load.HFModel`), or None for a preset; the
    directories' configs are read and checked here, so a bad one fails before any process starts."""
    from mimo.hf.config import HFConfigError
    from mimo.hf.load import HFLoadError, open_llava, open_pair

    pair = (section.vision_hf, section.language_hf)
    if section.hf is None and pair == (None, None):
        return None
    if section.hf is not None and pair != (None, None):
        raise RunConfigError("model: give either hf (a whole LLaVA directory) or vision_hf with language_hf, "
                             "not both")
    if section.hf is None and None in pair:
        missing = "language_hf" if section.language_hf is None else "vision_hf"
        raise RunConfigError(f"model: vision_hf and language_hf go together; {missing} is missing")
    try:
        if section.hf is not None:
            return open_llava(section.hf)
        return open_pair(section.vision_hf, section.language_hf, feature_layer=section.vision_feature_layer,
                         strategy=section.vision_feature_select_strategy)
    except (HFConfigError, HFLoadError) as e:
        raise RunConfigError(f"model: {e}") from None


def hf_parts(config: RunConfig, start_from: str | Path | None = None) -> list[HFPart]:
    """The parts of the run's model read from Hugging Face directories (`checkpoint.HFPart`, each with its
    directory's fingerprint), and whether its checkpoints leave each out: frozen, unless
    `checkpoint.save_frozen_hf_weights`, and not given other weights by `start_from`, the checkpoint the run's
    weights start from (its `--resume` checkpoint, else `checkpoint.pretrained_checkpoint`): a part that checkpoint
    holds has its weights, not the directory's, so only a part it left out too is left out (a part frozen on
    resume after training, or a stage 3 from a trained stage 2). A preset's model has none (its random weights
    are always saved)."""
    from mimo.hf.load import LANGUAGE as LANGUAGE_PREFIX
    from mimo.hf.load import PROJECTOR, VISION, fingerprint
    from mimo.training.checkpoint import HFPart, parts_left_out

    m, keep = config.model, config.checkpoint.save_frozen_hf_weights
    from_directory = (lambda name: True) if start_from is None else parts_left_out(start_from).__contains__
    parts = []
    for name, prefix, freeze, own in (("vision_encoder", VISION, m.freeze_vision_encoder, "vision_hf"),
                                      ("projector", PROJECTOR, m.freeze_projection, None),  # a pair's is seeded
                                      ("language_model", LANGUAGE_PREFIX, m.freeze_language_model, "language_hf")):
        setting = "hf" if m.hf is not None else own
        directory = getattr(m, setting) if setting else None
        if directory is not None:
            parts.append(HFPart(name, prefix, f"model.{setting}", str(Path(directory).absolute()),
                                fingerprint(directory), omitted=freeze and not keep and from_directory(name)))
    return parts


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `section.key=value` overrides, check every key and type."""
    return parse_run_config(overridden(read_yaml(path), overrides))


def overridden(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` (a run config's dict, changed in place) with each `a.b.c=value` of `overrides` applied."""
    for item in overrides:
        _apply_override(data, item)
    return data


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """A `RunConfig` from a plain dict; errors name the key path and what is allowed."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RunConfigError(f"unknown section(s) {unknown}; sections are {sorted(SECTIONS)}")
    if "parallelism" not in data:
        raise RunConfigError("missing section 'parallelism' (module name -> layout fields)")
    kwargs: dict[str, Any] = {"parallelism": data["parallelism"]}
    distributed = data.get("distributed") or {}
    if not isinstance(distributed, dict):
        raise RunConfigError(f"distributed: expected a mapping of module -> settings, got {distributed!r}")
    from mimo.distributed import ModuleDistributedConfig

    kwargs["distributed"] = {m: _fields(ModuleDistributedConfig, v, f"distributed.{m}", DISTRIBUTED_KEYS)
                             for m, v in distributed.items()}
    for name, f in SECTIONS.items():
        if name in ("parallelism", "distributed") or name not in data:
            continue
        kwargs[name] = _section(f.default_factory().__class__, data[name], name)
    return RunConfig(**kwargs)


def validate_run(config: RunConfig, world_size: int) -> list[str]:
    """The one check of a run before any work, on `world_size` ranks: the layout (finalized here), the
    batch split over micro-batches and every module's DP size, the distributed section, the Hugging Face
    directories the model section names, whether the model splits as the layout asks, and a llava run's data
    (file, image folder, tokenizer, template). `mimo validate`,
    the `mimo train` parent and every worker call it. Returns the layout's warnings (e.g. stub ranks)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.layout.finalize(world_size)
    config.layout.validate_batch(config.train.global_batch_size, config.train.num_microbatches)
    _check_distributed(config, world_size)
    hf_model(config.model)  # Hugging Face directories: their configs are read and checked here
    _check_model_fits(config)
    _check_pretrained(config)
    _check_data(config)
    return [str(w.message) for w in caught]


def _check_pretrained(config: RunConfig) -> None:
    """`checkpoint.pretrained_checkpoint` is an intact checkpoint with exactly this model's parameters (those it
    leaves out from this run's own Hugging Face directories)."""
    path = config.checkpoint.pretrained_checkpoint
    if path is None:
        return
    from mimo.training.checkpoint import CheckpointError, check_weights_fit, weights_path
    from mimo.training.loop import build_provider

    try:
        check_weights_fit(weights_path(path), build_provider(config, distributed=False).whole_meta_model(),
                          hf_parts(config))
    except CheckpointError as e:
        raise RunConfigError(f"checkpoint.pretrained_checkpoint: {e}") from None


def _check_model_fits(config: RunConfig) -> None:
    """The model's shapes split as the layout asks (TP divides heads, KV heads, features and vocabulary; PP at
    most the layers; the layout's modules are the model's), or a RunConfigError naming the module."""
    from mimo.distributed import WrapError
    from mimo.provider import ProviderError
    from mimo.training.loop import build_provider  # the run's model, as the workers will build it

    try:
        build_provider(config, distributed=False).check_layout(config.layout)
    except (WrapError, ProviderError) as e:
        raise RunConfigError(f"parallelism: {e}") from None


def _check_data(config: RunConfig) -> None:
    """A llava run's file, image folder, tokenizer, template and max_seq_len (`training.datasets`)."""
    if config.data.name != "llava":
        return
    from mimo.training.datasets import check_llava_data
    from mimo.training.loop import build_provider

    check_llava_data(config, build_provider(config, distributed=False).language_config.max_seq_len)


def _check_distributed(config: RunConfig, world_size: int | None) -> None:
    """Every module's distributed settings, by the wrapper's own check (`check_distributed`, before any process
    group: no backend), naming the section each came from; with the layout finalized for `world_size`, also the
    rules that need it (`tp_comm_overlap`'s)."""
    from mimo.distributed import WrapError, check_distributed

    layout = None if world_size is None else config.layout.finalize(world_size)
    try:
        check_distributed(config.distributed_config, config.layout.module_names, layout, label=_section_label)
    except WrapError as e:
        raise RunConfigError(str(e)) from None


def _section_label(name: str) -> str:
    """Where module `name`'s settings come from in a run config: `distributed.<name>`, or train for the default."""
    return "train" if name == "default" else f"distributed.{name}"


def _section(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types."""
    return cls(**_fields(cls, data, where))


def _fields(cls: type, data: Any, where: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """A mapping's items for dataclass `cls`, each key one of `keys` (default: every field) and each value of its
    field's type and range."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RunConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = list(fields) if keys is None else list(keys)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RunConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {allowed}")
    return {k: _in_range(_checked(v, hints[k], f"{where}.{k}"), fields[k].metadata, f"{where}.{k}")
            for k, v in data.items()}


def _in_range(value: Any, bounds: typing.Mapping[str, float], where: str) -> Any:
    """`value` (or each item of a list; None passes) within the field's `min`/`above`/`max`, else an error."""
    for item in value if isinstance(value, list) else [value]:
        low_ok = item is None or (item >= bounds["min"] if "min" in bounds else True) and \
            (item > bounds["above"] if "above" in bounds else True)
        if not low_ok or (item is not None and "max" in bounds and item > bounds["max"]):
            rule = " and ".join(f"{op} {bounds[k]}" for k, op in (("min", ">="), ("above", ">"), ("max", "<="))
                                if k in bounds)
            raise RunConfigError(f"{where}: must be {rule}, got {item!r}")
    return value


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits type `hint` (int, float, str, bool, None, Literal, list[int]), else an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise RunConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _checked(value, option, where)
            except RunConfigError:
                continue
        raise RunConfigError(f"{where}: {value!r} is not a {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise RunConfigError(f"{where}: expected a list, got {value!r}")
        return [_checked(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise RunConfigError(f"{where}: expected null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise RunConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    if hint is float and not math.isfinite(value):
        raise RunConfigError(f"{where}: must be a finite number, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: 3, 0.1, true, null, [1, 2], text)."""
    if "=" not in item:
        raise RunConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RunConfigError(f"--set {item!r}: empty key part in {key!r}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RunConfigError(f"--set {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = load_yaml_text(text)
    except yaml.YAMLError:
        raise RunConfigError(f"--set {item!r}: the value is not valid YAML") from None
