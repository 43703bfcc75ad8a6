"""The model families mimo trains, one line each (a family is a folder: see docs/architecture.md, "Adding a family")."""

from __future__ import annotations

import json
from pathlib import Path

from mimo.config import ConfigFileError, RunConfigError
from mimo.families.builtin import BUILTIN
from mimo.families.family import BuildSettings, EvalRequest, GenerationRequest, HFSource, ModelFamily
from mimo.families.llava import LLAVA
from mimo.families.qwen_vl import QWEN_VL

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLAVA, QWEN_VL, BUILTIN)}
DEFAULT_FAMILY = LLAVA.name  # a `model` section without `family` (every config written before families)


def family_named(name: object) -> ModelFamily:
    """The family `model.family` names, or an error listing the families."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise RunConfigError(f"model.family: {name!r} is not a model family; choose one of {list(FAMILIES)}")
    return FAMILIES[name]


def family_of_directory(directory: str | Path) -> ModelFamily:
    """The family whose Hugging Face `model_type`s include the directory's config.json's (`mimo generate --hf`)."""
    path = Path(directory) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ConfigFileError(f"--hf {directory}: cannot read {path} ({e}); give a Hugging Face model directory") \
            from None
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ConfigFileError(f"--hf {directory}: model_type {model_type!r} is no family's mimo reads; known: {known}")


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "BuildSettings", "EvalRequest", "GenerationRequest", "HFSource", "ModelFamily",
           "family_named", "family_of_directory"]
