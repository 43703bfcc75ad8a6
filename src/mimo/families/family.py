"""A model family's registry entry (torchtitan's `TrainSpec`): everything the run, the checkpoint and the command
line need of one kind of model, so that nothing outside the family's folder names its classes or modality keys.

A family owns its YAML `model` section (a dataclass with a `family` field), opens what that section names (its
Hugging Face directories, read once), builds the provider, says which parts come from Hugging Face directories
(so a checkpoint may leave them out), builds its datasets, counts its FLOPs, and exports and generates if it
has a Hugging Face form. The hooks it does not have are None, and whoever needs one says so in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimo.config import MimoParallelismConfig
from mimo.data.questions import HeldOutQuestions
from mimo.data.section import DataSection
from mimo.data.synthetic import ModalitySpec
from mimo.flops import ModalityFlops
from mimo.provider import MimoModelProvider


@dataclass(frozen=True)
class HFSource:
    """A part of the model whose weights a Hugging Face directory holds: a checkpoint may leave it out while it
    is frozen (`part`: its name in checkpoints, `prefix`: its parameters' names, `setting`: the run config key
    naming `directory`)."""

    part: str
    prefix: str
    setting: str
    directory: str
    frozen: bool


@dataclass(frozen=True)
class BuildSettings:
    """What a provider takes from the run besides the family's model section: the layout (None: one process holds
    the whole model), the parameters' dtype, the seed and the device parameters are made on."""

    layout: MimoParallelismConfig | None
    params_dtype: torch.dtype
    seed: int
    device: torch.device | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What `mimo generate` asks of a family: a prompt about `media` (image files, for an image family), and the
    data section of the run the model was trained in (its tokenizer and preprocessing), None for a Hugging Face
    directory (its own)."""

    media: tuple[Path, ...]
    prompt: str
    max_new_tokens: int
    data: DataSection | None = None


@dataclass(frozen=True)
class EvalRequest:
    """What `mimo eval` and a run's held-out answers ask of a family: a held-out file (None: the run's own held-out
    split, the digits'), the folder its images are in and the template that renders it (None: the run's, else the
    file's folder and the chat template), and the data section of the run the model was trained in (its tokenizer
    and preprocessing), None for a Hugging Face directory (its own)."""

    path: Path | None = None
    image_folder: Path | None = None
    template: str | None = None
    data: DataSection | None = None


@dataclass(frozen=True)
class ModelFamily:
    """One model family. `section` is the dataclass of its `model` section; `open(section)` reads what the
    section names (Hugging Face directories: once) into an object `provider` and the data hooks take; the rest
    receive the provider it built."""

    name: str
    section: type
    open: Callable[[Any], Any]
    provider: Callable[[Any, Any, BuildSettings], MimoModelProvider]
    hf_sources: Callable[[Any], list[HFSource]]
    synthetic_modalities: Callable[[MimoModelProvider], dict[str, ModalitySpec]]
    modality_flops: Callable[[MimoModelProvider], Mapping[str, ModalityFlops]]
    # data.name values beyond `synthetic` it reads, and how: (data section, model section, opened, provider,
    # split, dtype) -> dataset; check_data: (data section, model section, opened, provider) -> what a scan of the
    # whole data file found (`mimo.data.scan.DataScan`; the plan judges its bad rows), or None where none is made
    data_names: tuple[str, ...] = ()
    dataset: Callable[[DataSection, Any, Any, MimoModelProvider, str, torch.dtype], Any] | None = None
    check_data: Callable[[DataSection, Any, Any, MimoModelProvider], Any] | None = None
    # Hugging Face `model_type`s whose directories this family reads (`mimo generate --hf` picks the family so)
    hf_model_types: tuple[str, ...] = ()
    # (model, model section, the run's data section, provider, out_dir) -> the directory written, with its class
    # name for the message (the data section says which tokenizer and preprocessing the model was trained with)
    export: Callable[[nn.Module, Any, DataSection, MimoModelProvider, Path], tuple[Path, str]] | None = None
    # (model, model section, provider, request) -> the generated text
    generate: Callable[[nn.Module, Any, MimoModelProvider, GenerationRequest], str] | None = None
    # (model section, opened, provider, request, the items' dtype) -> the held-out questions `mimo eval` answers
    # and scores, rendered, tokenized and preprocessed as `generate` prompts
    questions: Callable[[Any, Any, MimoModelProvider, EvalRequest, torch.dtype], HeldOutQuestions] | None = None
    # the model section's keys that name Hugging Face directories (`--set model.KEY=PATH` re-points a checkpoint's),
    # the first a whole model's (`mimo generate --hf DIR` builds `section(KEY=DIR)`)
    hf_settings: tuple[str, ...] = ()
