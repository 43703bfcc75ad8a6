"""The Qwen-VL family's LLaVA-format data (`data.name: llava`): conversations through the directory's chat template
(`<|vision_start|><|image_pad|><|vision_end|>` where each image goes, as transformers' processor renders it), each
image at its native resolution through the directory's image processor (`data.min_pixels` / `data.max_pixels`
override its bounds), its `<|image_pad|>` expanded to the image's merged token count, the images packed with their
grids. The tokenizer is `data.tokenizer`, else the model directory's (`model.hf`); a preset has no processor
config, so its images take transformers' defaults (4 to 1280 tokens an image) at the tower's patch size.
Training, `export-hf` and `generate` all ask here."""

from __future__ import annotations

from pathlib import Path

import torch

from mimo.config import RunConfigError
from mimo.data.image_inputs import PackedImages
from mimo.data.llava import LlavaDataset
from mimo.data.qwen_image import QwenImageProcessor
from mimo.data.section import DataSection
from mimo.families.llava.data import check_llava_data
from mimo.families.qwen_vl.hf_load import IMAGES, QwenVLDirectory
from mimo.families.qwen_vl.hf_presets import qwen_vl_preset
from mimo.families.qwen_vl.provider import QwenVLMimoProvider
from mimo.families.qwen_vl.section import QwenVLSection
from mimo.hf.image import ImageConfigError, read_preprocessor_config
from mimo.hf.prompt import Prompter, PromptError
from mimo.models.qwen_vision import QwenVisionConfig

IMAGE_TOKEN = "<|image_pad|>"  # the processor's image token where the tokenizer names none (transformers' default)


def tokenizer_directory(data: DataSection | None, model: QwenVLSection) -> Path | None:
    """The tokenizer a model was trained with: `data.tokenizer`, else the model's directory; None for a preset run
    without one (synthetic data). `data` None: a Hugging Face directory's own."""
    directory = data.tokenizer if data is not None and data.tokenizer else model.hf
    return Path(directory) if directory else None


def open_prompter(directory: Path) -> Prompter:
    """The tokenizer and chat template of `directory` (its image token `<|image_pad|>` unless it names another),
    or a RunConfigError naming it."""
    try:
        return Prompter.from_directory(directory, default_image_token=IMAGE_TOKEN)
    except (PromptError, OSError, ValueError) as e:
        raise RunConfigError(f"data.tokenizer: {e} (set data.tokenizer to a directory with tokenizer.json)") from None


def image_processor(data: DataSection | None, model: QwenVLSection, vision: QwenVisionConfig) -> QwenImageProcessor:
    """The model directory's image processor (a preset: transformers' defaults, with its pixel bounds as token counts
    at the tower's patch size), with the run's `data.min_pixels` / `data.max_pixels`; one whose patches the tower
    cannot take is a RunConfigError."""
    try:
        if model.hf is not None:
            settings, where = read_preprocessor_config(model.hf)
            processor = QwenImageProcessor.from_dict(settings, where)
        else:  # transformers' default bounds, 4 to 1280 tokens an image, at the tower's patch size
            where, factor = f"preset {model.preset!r}", vision.patch_size * vision.spatial_merge_size
            processor = QwenImageProcessor(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                           merge_size=vision.spatial_merge_size, min_pixels=4 * factor**2,
                                           max_pixels=1280 * factor**2)
        if data is not None:
            processor = processor.with_pixels(data.min_pixels, data.max_pixels)
    except ImageConfigError as e:
        raise RunConfigError(f"model: {e}") from None
    geometry = {"patch_size": (processor.patch_size, vision.patch_size),
                "temporal_patch_size": (processor.temporal_patch_size, vision.temporal_patch_size),
                "merge_size": (processor.merge_size, vision.spatial_merge_size)}
    for key, (ours, tower) in geometry.items():
        if ours != tower:
            raise RunConfigError(f"model: {where}: {key}={ours}, but the vision tower's is {tower}; the image "
                                 f"processor must cut the patches the tower takes")
    return processor


def check_data(data: DataSection, model: QwenVLSection, opened: QwenVLDirectory | None,
               provider: QwenVLMimoProvider) -> None:
    """Before any worker starts: the data file, image folder, tokenizer and chat template as for LLaVA (with the
    tokenizer's share of unknown tokens; no scan of every row: an image's tokens depend on its size), the chat
    template being the only rendering, and the image processor."""
    if data.template != "chat":
        raise RunConfigError(f"data.template: the qwen_vl family renders conversations through the directory's chat "
                             f"template (chat), which writes each image's vision tokens; {data.template!r} is LLaVA's")
    directory = _required_tokenizer(data, model)
    check_llava_data(data, open_prompter(directory), provider.language_config.max_seq_len)
    image_processor(data, model, opened.spec.vision if opened is not None else _preset_vision(model))


def dataset(data: DataSection, model: QwenVLSection, opened: QwenVLDirectory | None, provider: QwenVLMimoProvider,
            split: str = "train", dtype: torch.dtype = torch.float32) -> LlavaDataset:
    """The run's LlavaDataset of native-resolution images, packed (`split` is the training file's: the held-out
    file comes as `data.path`)."""
    language = provider.language_config
    images = PackedImages(image_processor(data, model, provider.vision_config))
    try:
        return LlavaDataset(data.path, data.image_folder, open_prompter(_required_tokenizer(data, model)), images,
                            modality=IMAGES, image_token_id=provider.spec.image_token_id,
                            max_seq_len=data.max_seq_len or language.max_seq_len, template=data.template,
                            on_bad_sample=data.on_bad_sample, vocab_size=language.vocab_size, dtype=dtype,
                            cache_samples=data.cache_samples,
                            allow_paths_outside_image_folder=data.allow_paths_outside_image_folder,
                            max_image_pixels=data.max_image_pixels)
    except ValueError as e:  # DataFileError, TemplateError, a tokenizer that does not fit the model
        raise RunConfigError(f"data: {e}") from None


def _required_tokenizer(data: DataSection, model: QwenVLSection) -> Path:
    """`tokenizer_directory`, or the one-line error of a preset run that names no tokenizer."""
    directory = tokenizer_directory(data, model)
    if directory is None:
        raise RunConfigError("data.tokenizer: a preset model has no tokenizer; give data.tokenizer: DIR (a directory "
                             "with tokenizer.json and a Qwen chat template), or model.hf: a Qwen-VL directory")
    return directory


def _preset_vision(model: QwenVLSection) -> QwenVisionConfig:
    """The preset's tower config."""
    return qwen_vl_preset(model.preset).vision
