"""A parsed run turned into what its ranks build from: checked and built once, before any worker starts.

`plan_run` is the one check of a run (`mimo validate`, the `mimo train` parent, or each rank under torchrun):
the layout for the world, the batch split, the distributed settings, the model family's section (its Hugging
Face directories read once), the model against the layout, a pretrained checkpoint, the data. What it built
(the provider, the Hugging Face parts with their fingerprints) travels to the workers in the `RunPlan`, which
do not check again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimo.config import RunConfigError
from mimo.data import SyntheticDataset
from mimo.data.scan import DataScan
from mimo.data.section import DataSection
from mimo.distributed import WrapError, caches_float8_casts, module_fp8_layers, module_of
from mimo.families.registry import BuildSettings, ModelFamily, family_named
from mimo.flops import ModalityFlops
from mimo.fork_safe import cuda_present
from mimo.fp8 import FP8Error, check_machine, check_torchao, summary
from mimo.hf.load import fingerprint
from mimo.models.init import seeding_names
from mimo.provider import MimoModelProvider, ProviderError
from mimo.training.checkpoint import CheckpointError, HFPart, check_weights_fit, parts_left_out, weights_path
from mimo.training.run_config import RunConfig, check_distributed_sections


@dataclass
class RunPlan:
    """A run's config, its model family, what the family opened (Hugging Face configs and weight names), the
    provider (with the run's layout; process groups are made by a worker on first use), the parts read from
    Hugging Face directories, the layout's warnings, one line per module that runs fp8 (its converted
    layers: `mimo train` prints them), and what the check of the whole data file found."""

    config: RunConfig
    family: ModelFamily
    opened: Any
    provider: MimoModelProvider
    hf_parts: list[HFPart]
    warnings: list[str]
    fp8_lines: list[str] = field(default_factory=list)
    data_scan: DataScan | None = None  # what the check of the whole data file found (LLaVA-format data)

    def provider_on(self, device: torch.device) -> MimoModelProvider:
        """The run's provider for this rank's `device` (the same specs and weights source: nothing is rebuilt)."""
        return self.provider.placed(self.config.layout, device)

    def whole_model_provider(self, device: torch.device | None = None) -> MimoModelProvider:
        """The provider of the whole model in one process (evaluation, export, generation)."""
        return self.provider.placed(None, device)

    def dataset(self, provider: MimoModelProvider, split: str = "train") -> Any:
        """The run's dataset, shaped to the model: generated samples, or the family's (`data.name`); the held-out
        split of LLaVA-format data is `eval.path`, read as the training file is."""
        data, dtype = self.config.data, self.config.precision.param_dtype
        if split == "held_out" and data.name == "llava":
            data, split = dataclasses.replace(data, path=self.config.eval.path), "train"
        if data.name == "synthetic":
            specs = self.family.synthetic_modalities(provider)
            vocab = provider.language_config.vocab_size  # special ids inside it are skipped
            return SyntheticDataset(data.num_samples, specs, vocab_size=vocab, items_per_sample=tuple(
                data.items_per_sample), seed=self.config.train.seed, dtype=dtype)
        return self.family.dataset(data, self.config.model, self.opened, provider, split, dtype)

    def modality_flops(self) -> dict[str, ModalityFlops]:
        """The FLOP formulas of the model's modalities, as its family counts them."""
        return dict(self.family.modality_flops(self.provider))

    def hf_parts_from(self, start_from: str | Path | None) -> list[HFPart]:
        """The Hugging Face parts a run starting from checkpoint `start_from` leaves out of its checkpoints: a part
        that checkpoint holds has its weights, not the directory's, so only a part it left out too stays out (a
        part frozen on resume after training, or a stage 3 from a trained stage 2)."""
        if start_from is None:
            return self.hf_parts
        left_out = parts_left_out(start_from)
        return [dataclasses.replace(p, omitted=p.omitted and p.name in left_out) for p in self.hf_parts]


def plan_model(config: RunConfig, check_parts: Callable[[list[HFPart]], None] | None = None) -> RunPlan:
    """The run's model alone (family, opened directories, provider, Hugging Face parts), with no check of the
    layout's world or the data: what `export-hf` and `generate` need of a checkpoint's carried config.
    `check_parts` sees the Hugging Face parts before any directory is opened (a checkpoint's omitted parts must
    be where it says: a moved directory is named as such, not as a directory that does not open)."""
    family = family_named(config.model.family)
    parts = hf_parts(family, config)
    if check_parts is not None:
        check_parts(parts)
    opened = family.open(config.model)
    settings = BuildSettings(config.layout, config.precision.param_dtype, config.train.seed)
    try:
        provider = family.provider(config.model, opened, settings)
    except ProviderError as e:  # the layout names modules the model has not (a misspelled `image:`, an `audio:`)
        raise RunConfigError(f"parallelism: {e}") from None
    return RunPlan(config, family, opened, provider, parts, [])


def plan_run(config: RunConfig, world_size: int) -> RunPlan:
    """The one check of a run on `world_size` ranks, before any work (see the module docstring), and what it built.
    The layout's warnings (e.g. stub ranks) are `RunPlan.warnings`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.layout.finalize(world_size)
    config.layout.validate_batch(config.train.global_batch_size, config.train.num_microbatches)
    check_distributed_sections(config, world_size)
    plan = plan_model(config)
    plan.warnings = [str(w.message) for w in caught] + _no_evaluation(config)
    _check_model_fits(plan)
    _check_fp8_machine(config)
    _check_memory_machine(config)
    plan.fp8_lines = fp8_lines(plan)
    _check_hf_weights(plan)
    _check_pretrained(plan)
    _check_data(plan)
    return plan


def hf_parts(family: ModelFamily, config: RunConfig) -> list[HFPart]:
    """The parts of the run's model read from Hugging Face directories, each with its directory's fingerprint
    (taken here, once), and whether the run's checkpoints leave it out: frozen, unless
    `checkpoint.save_frozen_hf_weights`. A model with no Hugging Face directory has none."""
    keep = config.checkpoint.save_frozen_hf_weights
    return [HFPart(s.part, s.prefix, s.setting, str(Path(s.directory).absolute()), fingerprint(s.directory),
                   omitted=s.frozen and not keep) for s in family.hf_sources(config.model)]


def _check_model_fits(plan: RunPlan) -> None:
    """The model's shapes split as the layout asks (TP divides heads, KV heads, features and vocabulary; PP at
    most the layers; the layout's modules are the model's), or a RunConfigError naming the module."""
    try:
        plan.provider.check_layout(plan.config.layout)
    except (WrapError, ProviderError) as e:
        raise RunConfigError(f"parallelism: {e}") from None


def _check_fp8_machine(config: RunConfig) -> None:
    """A module that asks for fp8 has torchao and a CUDA GPU to run on (`mimo.fp8.check_torchao`, `check_machine`;
    each rank checks its GPU's compute capability when it wraps the model)."""
    for name in config.layout.module_names:
        try:
            recipe = config.distributed_config.for_module(name).fp8
            check_torchao(f"distributed.{name}", recipe)
            check_machine(f"distributed.{name}", recipe)
        except FP8Error as e:
            raise RunConfigError(str(e)) from None


def _check_memory_machine(config: RunConfig) -> None:
    """`log.memory_snapshot` records the CUDA allocator: refused where there is none (`fork_safe.cuda_present`, which
    leaves workers forkable)."""
    if config.log.memory_snapshot and not cuda_present():
        raise RunConfigError(f"log.memory_snapshot: {config.log.memory_snapshot} records the CUDA allocator, and this "
                             f"machine has no CUDA GPU; set log.memory_snapshot: 0")


def fp8_lines(plan: RunPlan) -> list[str]:
    """For each module that runs fp8, one line naming the linear layers it converts and those it keeps (the
    decision every rank's wrapper applies, `distributed.module_fp8_layers`, over the whole model on the meta
    device; a layout that fits, `_check_model_fits`)."""
    settings, layout = plan.config.distributed_config, plan.config.layout
    asked = [name for name in layout.module_names if settings.for_module(name).fp8 != "none"]
    if not asked:
        return []
    model = plan.provider.whole_meta_model()
    lines = []
    for name in asked:
        parallelism = layout.get_parallelism(name)
        cfg, tp = settings.for_module(name), parallelism.tensor_model_parallel_size
        layers = module_fp8_layers(name, module_of(model, name), cfg, tp, parallelism.sequence_parallel)
        lines.append(summary(name, layers, compiled=cfg.compile, cached=caches_float8_casts(cfg, tp)))
    return lines


def _check_hf_weights(plan: RunPlan) -> None:
    """Every parameter read from a Hugging Face directory is there, with the shape the model needs and a float
    dtype, every file it is in whole (headers only are read): else one HFLoadError here, not 40 lines per worker."""
    source = plan.provider.initial_weights
    if source is None or not hasattr(source, "check"):
        return
    for name, param, _ in seeding_names(plan.provider.whole_meta_model()):
        source.check(name, param)


def _check_pretrained(plan: RunPlan) -> None:
    """`checkpoint.pretrained_checkpoint` is an intact checkpoint with exactly this model's parameters (those it
    leaves out from this run's own Hugging Face directories)."""
    path = plan.config.checkpoint.pretrained_checkpoint
    if path is None:
        return
    try:
        check_weights_fit(weights_path(path), plan.provider.whole_meta_model(), plan.hf_parts)
    except CheckpointError as e:
        raise RunConfigError(f"checkpoint.pretrained_checkpoint: {e}") from None


def _no_evaluation(config: RunConfig) -> list[str]:
    """A line saying so when eval.enabled (the default) finds nothing to evaluate in LLaVA-format data: never
    silently nothing (generated data has no held-out split to speak of)."""
    if not config.eval.enabled or config.evaluates or config.data.name != "llava":
        return []
    return ["eval: no held-out evaluation for this run (set eval.path: HELD_OUT.json (LLaVA-format) for a held-out "
            "loss; eval.enabled: false silences this)"]


def _check_data(plan: RunPlan) -> None:
    """The data is one the family reads, and can be read here (the digits: scikit-learn installed; a llava run's
    file, image folder, tokenizer, template and max_seq_len: the family's check)."""
    data, family = plan.config.data, plan.family
    if data.name != "synthetic" and data.name not in family.data_names:
        readable = ["synthetic", *family.data_names]
        raise RunConfigError(f"data.name: the {family.name} family does not read {data.name!r} data; it reads "
                             f"{readable}")
    if data.name == "digits" and importlib.util.find_spec("sklearn") is None:
        raise RunConfigError("data.name 'digits' reads scikit-learn's bundled scans, but scikit-learn is not "
                             "installed: pip install scikit-learn (or use data.name synthetic)")
    if plan.config.eval.path is not None and not Path(plan.config.eval.path).is_file():
        raise RunConfigError(f"eval.path: {plan.config.eval.path} is not a file (a LLaVA JSON or JSONL file)")
    if plan.config.answers_held_out and family.questions is None:
        raise RunConfigError(f"eval.generate: the {family.name} family cannot answer held-out questions (yet); set "
                             f"eval.generate: false (the held-out loss only)")
    if family.check_data is not None and data.name != "synthetic":
        with warnings.catch_warnings(record=True) as caught:  # e.g. a share of unknown tokens: said before launch
            warnings.simplefilter("always")
            plan.data_scan = family.check_data(data, plan.config.model, plan.opened, plan.provider)
        plan.warnings += [str(w.message) for w in caught]
        if plan.data_scan is not None:
            plan.warnings += _judge_bad_rows(plan.data_scan, data)


class BadDataError(RunConfigError):
    """More bad rows in the data file than the run allows; `scan` is what the check found."""

    def __init__(self, message: str, scan: DataScan) -> None:
        super().__init__(message)
        self.scan = scan


def _judge_bad_rows(scan: DataScan, data: DataSection) -> list[str]:
    """A BadDataError when the file's bad rows exceed `data.max_bad_sample_rate` (any, with on_bad_sample error:
    the run would stop on one); else a line saying how many will be skipped, if any."""
    if not scan.bad_rows:
        return []
    share = f"{scan.bad_rows} of {scan.rows} rows of {scan.path} ({scan.bad_rows / scan.rows:.2%}) are bad"
    if data.on_bad_sample == "error":
        raise BadDataError(f"data.path: {share}, and data.on_bad_sample is error: {scan.bad_reasons()}; fix them "
                           f"or set data.on_bad_sample: skip (mimo validate lists them)", scan)
    if scan.bad_rows > data.max_bad_sample_rate * scan.rows:
        raise BadDataError(f"data.path: {share}, more than data.max_bad_sample_rate {data.max_bad_sample_rate} "
                           f"allows: {scan.bad_reasons()}; fix them or raise data.max_bad_sample_rate (mimo validate "
                           f"lists them)", scan)
    return [f"data: {share} and will be skipped: {scan.bad_reasons()}"]
