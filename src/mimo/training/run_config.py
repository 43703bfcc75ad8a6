"""The `mimo train` YAML: sections model, parallelism, distributed, train, data, checkpoint, log, eval.

Read safely, overridden with `--set section.key=value`, checked field by field: an unknown key or a value
of the wrong type is an error that names the key and what is allowed, before any process starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mimo.config import LayoutError, MimoParallelismConfig, RunConfigError, load_yaml_text, read_yaml, shown
from mimo.data.section import DataSection
from mimo.distributed import DistributedConfig, ModuleDistributedConfig, WrapError, check_distributed
from mimo.families.registry import DEFAULT_FAMILY, family_named
from mimo.precision import PrecisionPolicy


@dataclass
class TrainSection:
    """Steps, batch, optimizer and precision. dtype: float32 or float64 everywhere; bfloat16 / float16 compute
    with float32 parameters (float16 with one dynamic loss scale for the whole model)."""

    steps: int = field(default=100, metadata={"min": 1})  # optimizer steps the run takes in all
    global_batch_size: int = field(default=32, metadata={"min": 1})  # samples per step, over every replica
    # micro-batches the global batch is split into, each divided over every module's DP (gradients accumulate;
    # a pipeline's micro-batches)
    num_microbatches: int = field(default=1, metadata={"min": 1})
    # AdamW's peak learning rate; 0 trains nothing: a conversion or a speed run
    lr: float = field(default=1e-3, metadata={"min": 0})
    # the cosine schedule ends at min_lr_ratio · lr at the last step
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0, "max": 1})
    warmup_steps: int = field(default=0, metadata={"min": 0})  # steps of linear warm-up to lr before the cosine
    # AdamW's decoupled weight decay, on matrices only (norms and biases never decay)
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    clip_grad: float | None = field(default=1.0, metadata={"above": 0})  # the global gradient norm cap; null: none
    seed: int = 0  # seeds the weights' initialization, the data order and the synthetic data
    # parameters' and compute dtype: float32 / float64 everywhere; bfloat16 / float16 compute, float32 parameters
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    # the next three are every module's defaults; `distributed.<module>` may set its own
    compile: bool = False  # torch.compile each transformer block (GPU: ~30% faster at 1b, see benchmarks/)
    # full: each transformer block keeps only its input and runs its forward again in the backward (memory of
    # its activations for about a third more compute); recompute_num_layers: only the first N of each
    # module's stage (null: all). Checked with each module's settings (`ModuleDistributedConfig.check`)
    recompute_granularity: Literal["none", "full"] = "none"
    recompute_num_layers: int | None = None  # with full recomputation, only the first N blocks of each stage
    # the longest a collective (and the process group's setup) may wait before torch ends it with an error
    timeout_s: float = field(default=300.0, metadata={"above": 0})
    # this many steps in a row with a loss (or an applied gradient) that is NaN or infinite end the run with an
    # error (it has diverged: more steps only write checkpoints of NaN); such steps save no checkpoint
    max_nonfinite_steps: int = field(default=3, metadata={"min": 1})
    # stop cleanly once the run has taken this many minutes (from `mimo train`'s start): a checkpoint after the
    # step that passed it (whatever checkpoint.final says), then exit 0; `--resume` continues (a scheduler's
    # wall-time limit; Megatron's name)
    exit_duration_in_mins: float | None = field(default=None, metadata={"above": 0})
    # on SIGTERM (a scheduler's preemption notice) finish the step in flight, checkpoint it, exit; the launcher
    # gives its workers 30 s after forwarding the signal (torch elastic's grace) before it kills them
    exit_signal_handler: bool = False


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

    dir: str | None = None  # where the checkpoints go; null: log.dir's checkpoints/
    interval: int = field(default=0, metadata={"min": 0})  # checkpoint every this many steps; 0: only at the end
    keep: int = field(default=2, metadata={"min": 1})  # the newest complete checkpoints kept; older ones are deleted
    # a mimo checkpoint (or a run directory: its newest) whose weights alone a new run starts from
    pretrained_checkpoint: str | None = None
    final: bool = True  # false: no checkpoint at the end (a speed run)
    # false: leave out each frozen part read from a Hugging Face directory (recorded with its fingerprint instead)
    save_frozen_hf_weights: bool = False


@dataclass
class LogSection:
    """The run directory (config, metrics.jsonl, checkpoints by default) and logging cadence."""

    dir: str = "runs/mimo"  # the run directory: config.yaml, metrics.jsonl, and checkpoints unless checkpoint.dir
    interval: int = field(default=10, metadata={"min": 1})  # write a metrics.jsonl line every this many steps
    tensorboard: bool = False  # also write TensorBoard event files to the run directory's tb/
    # GPU runs: record the CUDA allocator from the start (slower steps until then); after this step (or at an
    # out-of-memory error) each rank writes memory/rank{r}.pickle (https://pytorch.org/memory_viz) and rank{r}.txt
    # (who held the peak); 0: off
    memory_snapshot: int = field(default=0, metadata={"min": 0})


@dataclass
class EvalSection:
    """Held-out evaluation, on the run's checkpoints loaded whole into one process, at the end and every `interval`
    steps (at checkpoints: a multiple of checkpoint.interval; 0: at the end only): the mean per-token loss of the
    held-out data (the digits' split, or for LLaVA-format data `path`, its images in data.image_folder, rendered as
    the training data) and, with `generate`, greedy answers scored against the references (exact match, token
    accuracy), by the path `mimo eval` takes."""

    enabled: bool = True  # false: no held-out evaluation at all
    # llava data: a LLaVA-format held-out file (images in data.image_folder) whose mean per-token loss is logged
    path: str | None = None
    # evaluate the held-out data every this many steps, a multiple of checkpoint.interval; 0: at the end only
    interval: int = field(default=0, metadata={"min": 0})
    # also answer the held-out questions by greedy generation and score them; null: on for the digits, off for
    # llava data (its loss only)
    generate: bool | None = None
    max_new_tokens: int = field(default=32, metadata={"min": 1})  # generate: the longest answer, in tokens
    batch_size: int = field(default=32, metadata={"min": 1})  # generate: questions decoded together


@dataclass
class RunConfig:
    """A whole training run."""

    parallelism: dict[str, dict[str, Any]]
    model: Any = field(default_factory=lambda: family_named(DEFAULT_FAMILY).section())  # the family's section
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
        check_distributed_sections(self, world_size=None)
        if not self.checkpoint.final and self.evaluates:
            what = "the digits" if self.data.name == "digits" else self.eval.path
            raise RunConfigError(f"checkpoint.final: false leaves no checkpoint for the held-out evaluation of {what}; "
                                 f"set eval.enabled: false, or keep checkpoint.final: true")
        self._check_eval()
        if self.log.memory_snapshot > self.train.steps:
            raise RunConfigError(f"log.memory_snapshot: step {self.log.memory_snapshot} is past the run's last "
                                 f"(train.steps {self.train.steps}); ask for a step up to it, or 0 (off)")

    def _check_eval(self) -> None:
        """eval.path is LLaVA-format data's held-out file; eval.interval falls on checkpoints."""
        if self.eval.path is not None and self.data.name != "llava":
            raise RunConfigError(f"eval.path: a held-out file is for data.name llava, and data.name is "
                                 f"{self.data.name!r} (the digits bring their own held-out split)")
        if self.eval.generate and not self.evaluates:
            raise RunConfigError("eval.generate: true answers held-out questions, and this run has none: set "
                                 "eval.path (LLaVA-format data) or train on the digits, or eval.generate: false")
        interval, saved = self.eval.interval, self.checkpoint.interval
        if interval and (not self.evaluates or not saved or interval % saved):
            raise RunConfigError(f"eval.interval: {interval} evaluates the checkpoint of every {interval}th step, so "
                                 f"it needs held-out data (eval.path, or the digits) and a checkpoint.interval that "
                                 f"divides it (checkpoint.interval is {saved}); or set eval.interval: 0 (at the end "
                                 f"only)")

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates on held-out data: the digits' split, or LLaVA-format data's eval.path."""
        return self.eval.enabled and (self.data.name == "digits" or self.eval.path is not None)

    @property
    def answers_held_out(self) -> bool:
        """Whether the evaluation also answers the held-out questions (`eval.generate`; null: the digits do)."""
        generate = self.eval.generate if self.eval.generate is not None else self.data.name == "digits"
        return self.evaluates and generate

    @property
    def layout(self) -> MimoParallelismConfig:
        """The parallelism section as a `MimoParallelismConfig`, built once (finalized by `plan_run`)."""
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
# run's, from train.dtype) and fp8_emulate (tests); compile and the recompute pair override train's for that module
DISTRIBUTED_KEYS = ("data_parallel", "reshard_after_forward", "compile", "recompute_granularity",
                    "recompute_num_layers", "fp8", "fp8_small_layers", "cache_weight_casts",
                    "align_gemms")


def distributed_settings(sections: dict[str, dict[str, Any]], train: TrainSection,
                         precision: PrecisionPolicy) -> DistributedConfig:
    """Each module's `ModuleDistributedConfig`: its `distributed.<module>` keys over train's compile and recompute
    settings (recompute_num_layers comes from the section that sets recompute_granularity), computing in the
    run's compute dtype where it is mixed (else None: the parameters' own); modules not named take the default."""
    run_wide = {"compile": train.compile, "recompute_granularity": train.recompute_granularity,
                "recompute_num_layers": train.recompute_num_layers}
    compute = precision.compute_dtype if precision.mixed else None

    def settings(section: dict[str, Any]) -> ModuleDistributedConfig:
        own_pair = "recompute_granularity" in section
        inherited = {k: v for k, v in run_wide.items() if not (own_pair and k == "recompute_num_layers")}
        return ModuleDistributedConfig(**{**inherited, **section}, compute_dtype=compute)

    return DistributedConfig(settings({}), {m: settings(section) for m, section in sections.items()})


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
        raise RunConfigError(f"unknown section(s) {shown(unknown, 200)}; sections are {sorted(SECTIONS)}")
    if "parallelism" not in data:
        raise RunConfigError("missing section 'parallelism' (module name -> layout fields)")
    kwargs: dict[str, Any] = {"parallelism": data["parallelism"]}
    distributed = data.get("distributed") or {}
    if not isinstance(distributed, dict):
        raise RunConfigError(f"distributed: expected a mapping of module -> settings, got {shown(distributed)}")
    kwargs["distributed"] = {m: _fields(ModuleDistributedConfig, v, f"distributed.{m}", DISTRIBUTED_KEYS)
                             for m, v in distributed.items()}
    kwargs["model"] = _model_section(data.get("model"))
    for name, f in SECTIONS.items():
        if name in ("parallelism", "distributed", "model") or name not in data:
            continue
        kwargs[name] = _section(f.default_factory().__class__, data[name], name)
    return RunConfig(**kwargs)


def check_distributed_sections(config: RunConfig, world_size: int | None) -> None:
    """Every module's distributed settings, by the wrapper's own check (`check_distributed`, before any process
    group: no backend), naming the section each came from; with the layout finalized for `world_size`, also the
    rules that need it (`tp_comm_overlap`'s)."""
    layout = None if world_size is None else config.layout.finalize(world_size)
    try:
        check_distributed(config.distributed_config, config.layout.module_names, layout, label=_section_label)
    except WrapError as e:
        raise RunConfigError(str(e)) from None


def _section_label(name: str) -> str:
    """Where module `name`'s settings come from in a run config: `distributed.<name>`, or train for the default."""
    return "train" if name == "default" else f"distributed.{name}"


def _model_section(data: Any) -> Any:
    """The `model` section as its family's dataclass (`model.family`, by default LLaVA's)."""
    family = family_named(data.get("family", DEFAULT_FAMILY) if isinstance(data, dict) else DEFAULT_FAMILY)
    return _section(family.section, data, "model")


def _section(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and value types."""
    return cls(**_fields(cls, data, where))


def _fields(cls: type, data: Any, where: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """A mapping's items for dataclass `cls`, each key one of `keys` (default: every field) and each value of its
    field's type and range."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RunConfigError(f"{where}: expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = list(fields) if keys is None else list(keys)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RunConfigError(f"{where}: unknown key(s) {shown(unknown, 200)}; allowed keys are {allowed}")
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
            raise RunConfigError(f"{where}: must be {rule}, got {shown(item)}")
    return value


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits type `hint` (int, float, str, bool, None, Literal, list[int]), else an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise RunConfigError(f"{where}: {shown(value)} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _checked(value, option, where)
            except RunConfigError:
                continue
        raise RunConfigError(f"{where}: {shown(value)} is not a {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise RunConfigError(f"{where}: expected a list, got {shown(value)}")
        return [_checked(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise RunConfigError(f"{where}: expected null, got {shown(value)}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise RunConfigError(f"{where}: expected {hint.__name__}, got {shown(value)} ({type(value).__name__})")
    if hint is float and not math.isfinite(value):
        raise RunConfigError(f"{where}: must be a finite number, got {shown(value)}")
    return value


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: 3, 0.1, true, null, [1, 2], text)."""
    if "=" not in item:
        raise RunConfigError(f"--set {shown(item)}: expected key=value, e.g. train.steps=100")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RunConfigError(f"--set {shown(item)}: empty key part in {shown(key)}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RunConfigError(f"--set {shown(item)}: {shown(part)} is not a section")
    try:
        node[parts[-1]] = load_yaml_text(text)
    except (yaml.YAMLError, RecursionError):  # RecursionError: thousands of nested brackets
        raise RunConfigError(f"--set {shown(item)}: the value is not valid YAML") from None
