"""Qwen-VL's Hugging Face weights: mimo's names and a directory's (transformers 5's `model.visual.` /
`model.language_model.`, and the hub's transformers-4 `visual.` / `model.`), and `QwenVLDirectory`, what a
model section's directory describes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mimo.families.qwen_vl.hf_config import QwenVLSpec, qwen_vl_spec
from mimo.hf.config import read_config
from mimo.hf.load import HFWeights, NameRule, SafetensorsDir

IMAGES = "images"  # Qwen-VL's modality: its module name, special token and batch key
VISION = f"modality_submodules.{IMAGES}.encoder."
LANGUAGE = "language_model."

# mimo prefix -> a Qwen-VL file's prefixes, what `save_pretrained` writes (transformers 5) first
QWEN_VL_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (VISION, ("model.visual.", "visual.")),
    (LANGUAGE + "lm_head.", ("lm_head.",)),
    (LANGUAGE, ("model.language_model.", "model.")),
)


@dataclass(frozen=True)
class QwenVLDirectory:
    """A Qwen-VL Hugging Face directory: its spec and where each weight comes from."""

    path: Path
    spec: QwenVLSpec
    rules: tuple[NameRule, ...]

    def weights(self) -> HFWeights:
        """A fresh source (with its own read log) for one model build."""
        return HFWeights(self.rules)


def open_qwen_vl(directory: str | Path) -> QwenVLDirectory:
    """Read a Qwen-VL directory's config (strictly) and index its safetensors, once."""
    path = Path(directory)
    spec = qwen_vl_spec(read_config(path), f"{path}/config.json")
    files = SafetensorsDir(path)
    return QwenVLDirectory(path, spec, tuple(NameRule(prefix, files, hf) for prefix, hf in QWEN_VL_NAMES))
