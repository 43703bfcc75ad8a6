"""A whole mimo Qwen-VL model → a directory `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration`
`.from_pretrained` loads: parameters under the names `save_pretrained` writes (a tied head left out, as it leaves
it out), the origin directory's config.json and its tokenizer, processor and chat-template files (a preset: its
config as `hf_presets` holds it), the run's own tokenizer (`data.tokenizer`) and image processing
(`data.min_pixels` / `data.max_pixels`) over them. Loaded from a directory and exported untrained, every tensor is
bit-exact."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mimo.data.section import DataSection
from mimo.families.qwen_vl.data import image_processor
from mimo.families.qwen_vl.hf_load import LANGUAGE, VISION
from mimo.families.qwen_vl.hf_presets import PRESET_CONFIGS
from mimo.families.qwen_vl.provider import QwenVLMimoProvider
from mimo.families.qwen_vl.section import QwenVLSection
from mimo.hf.carry import TOKENIZER_FILES, carry_files, dtype_name
from mimo.hf.config import read_config
from mimo.hf.load import HFLoadError
from mimo.hf.shards import check_new_directory, write_safetensors

ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


# mimo prefix -> the prefix `save_pretrained` writes, per model_type: transformers 5 writes Qwen2.5-VL in the hub's
# older spelling (`visual.`, `model.`) and Qwen3-VL in its own (`model.visual.`, `model.language_model.`)
SAVED_PREFIXES = {
    "qwen2_5_vl": {VISION: "visual.", LANGUAGE + "lm_head.": "lm_head.", LANGUAGE: "model."},
    "qwen3_vl": {VISION: "model.visual.", LANGUAGE + "lm_head.": "lm_head.", LANGUAGE: "model.language_model."},
}


def to_qwen_vl_name(name: str, kind: str) -> str:
    """The name `save_pretrained` gives mimo parameter `name` in a directory of model_type `kind`."""
    for prefix, saved in SAVED_PREFIXES[kind].items():
        if name.startswith(prefix):
            return saved + name[len(prefix):]
    raise HFLoadError(f"{name} has no place in a Qwen-VL checkpoint")


def export(model: nn.Module, section: QwenVLSection, data: DataSection, provider: QwenVLMimoProvider,
           out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> tuple[Path, str]:
    """Write the whole, unwrapped model of `provider` as a Hugging Face Qwen-VL directory."""
    out = Path(out_dir)
    check_new_directory(out)
    kind = provider.spec.kind
    tensors = {to_qwen_vl_name(n, kind): p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    architecture = ARCHITECTURES[kind]
    config = read_config(section.hf) if section.hf else {**PRESET_CONFIGS[section.preset],
                                                         "architectures": [architecture]}
    config["dtype"] = dtype_name(next(iter(tensors.values())).dtype)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(((name, tensors[name]) for name in sorted(tensors)), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_run_preprocessing(section, data, provider, out)
    carry_files(section.hf, out)
    return out, architecture


def _write_run_preprocessing(section: QwenVLSection, data: DataSection, provider: QwenVLMimoProvider,
                             out: Path) -> None:
    """What the run trained with where it is not the origin directory's: `data.tokenizer`'s files, and for
    LLaVA-format data with `data.min_pixels` / `data.max_pixels` (or from a preset) the image processor it used, so
    transformers prompts the export as the run was trained."""
    if data.tokenizer:
        carry_files(data.tokenizer, out, TOKENIZER_FILES)
    if data.name == "llava" and (section.hf is None or data.min_pixels or data.max_pixels):
        processor = image_processor(data, section, provider.vision_config)
        (out / "preprocessor_config.json").write_text(json.dumps(processor.to_dict(), indent=2) + "\n")
