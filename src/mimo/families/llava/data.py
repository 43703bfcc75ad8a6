"""The LLaVA family's datasets, from the data and model sections: which tokenizer, which image processing.

The tokenizer is `data.tokenizer` when given, else the model's Hugging Face directory (`model.hf`, or
`model.language_hf`); the image preprocessing is the vision directory's preprocessor config (`model.hf` or
`model.vision_hf`), or for a preset a plain resize to its input size. The built-in digits (`data.name: digits`)
go through the same dataset: PNGs and LLaVA JSON in mimo's cache, mimo's word-level tokenizer, the chat
template.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mimo.config import RunConfigError
from mimo.data.digits_llava import DIGITS_TOKENIZER, digits_llava_files
from mimo.data.image_inputs import FixedSizeImages
from mimo.data.llava import DataFileError, Entries, LlavaDataset, check_data_file
from mimo.data.section import DataSection
from mimo.data.templates import TemplateError, build_template
from mimo.data.unknown_tokens import unknown_tokens
from mimo.families.llava.hf_load import HFModel
from mimo.families.llava.provider import IMAGES, LlavaMimoProvider
from mimo.families.llava.section import LlavaSection
from mimo.hf.image import ImageConfigError, ImageProcessor
from mimo.hf.prompt import Prompter, PromptError


def tokenizer_directory(data: DataSection, model: LlavaSection) -> Path:
    """Where the tokenizer of a run comes from (see the module docstring): the digits' own, else `data.tokenizer`,
    else the model's directory; or an error saying so. Training, export and `generate` all ask here."""
    if data.name == "digits":
        return DIGITS_TOKENIZER
    directory = data.tokenizer or model.text_directory
    if directory is None:
        raise RunConfigError("data.tokenizer: a preset model has no tokenizer; give data.tokenizer: DIR (a directory "
                             "with tokenizer.json), or a model from Hugging Face directories")
    return Path(directory)


def open_prompter(directory: Path) -> Prompter:
    """The tokenizer of `directory`, or a RunConfigError naming it."""
    try:
        return Prompter.from_directory(directory)
    except (PromptError, OSError, ValueError) as e:
        raise RunConfigError(f"data.tokenizer: {e} (set data.tokenizer to a directory with tokenizer.json)") from None


def image_processor(model: LlavaSection, image_size: int) -> ImageProcessor:
    """The vision directory's image preprocessing, or for a preset a resize to `image_size`."""
    directory = model.image_directory
    if directory is None:
        return ImageProcessor.square(image_size)
    try:
        return ImageProcessor.from_directory(directory)
    except ImageConfigError as e:
        raise RunConfigError(f"model: {e}") from None


def check_data(data: DataSection, model: LlavaSection, opened: HFModel | None, max_seq_len: int) -> None:
    """Before any worker starts: a llava run's data file and image folder exist, the tokenizer loads, the template
    suits it, and max_seq_len fits the language model (`max_seq_len`); the digits need nothing checked here."""
    if data.name != "llava":
        return
    pixels = [k for k in ("min_pixels", "max_pixels") if getattr(data, k) is not None]
    if pixels:
        raise RunConfigError(f"data.{pixels[0]}: bounds a native-resolution image's pixels (model.family qwen_vl); "
                             f"a LLaVA tower takes one size, its image processor's")
    check_llava_data(data, open_prompter(tokenizer_directory(data, model)), max_seq_len)


def check_llava_data(data: DataSection, prompter: Prompter, max_seq_len: int) -> None:
    """What every family that reads LLaVA-format data checks before any worker starts: the data file and image
    folder exist, the file is UTF-8 (a JSON array), max_seq_len fits the language model (`max_seq_len`), the
    template suits the tokenizer `prompter`, and the first samples' share of unknown tokens."""
    if not Path(data.path).is_file():
        raise RunConfigError(f"data.path: {data.path} is not a file (a LLaVA JSON or JSONL file)")
    if not Path(data.image_folder).is_dir():
        raise RunConfigError(f"data.image_folder: {data.image_folder} is not a directory")
    try:
        check_data_file(data.path)
    except DataFileError as e:
        raise RunConfigError(f"data.path: {e}") from None
    if data.max_seq_len is not None and data.max_seq_len > max_seq_len:
        raise RunConfigError(f"data.max_seq_len: {data.max_seq_len} exceeds the language model's max_seq_len "
                             f"{max_seq_len}; use at most {max_seq_len}")
    try:
        template = build_template(data.template, prompter)
    except TemplateError as e:
        raise RunConfigError(f"data.template: {e}") from None
    _check_unknown_tokens(data, template, prompter)


def _check_unknown_tokens(data: DataSection, template, prompter: Prompter) -> None:
    """The first samples' share of `<unk>` tokens: warned about when some, refused above
    `data.max_unknown_token_rate` (a tokenizer that lacks the data's words), naming the words."""
    try:
        entries = Entries(data.path)
    except DataFileError as e:
        raise RunConfigError(f"data.path: {e}") from None
    found = unknown_tokens(entries, template, prompter)
    if found is None or found.unknown == 0:
        return
    words = ", ".join(repr(w) for w in found.words)
    said = (f"{found.rate:.1%} of the tokens of the first {found.samples} samples ({found.unknown} of {found.tokens}) "
            f"are the tokenizer's unknown token; words it lacks: {words}")
    if found.rate > data.max_unknown_token_rate:
        raise RunConfigError(f"data.tokenizer: {said}; this tokenizer does not fit the data (use the language "
                             f"model's own tokenizer), or set data.max_unknown_token_rate above {found.rate:.3f} "
                             f"to train anyway")
    warnings.warn(f"data: {said}", stacklevel=2)


def dataset(data: DataSection, model: LlavaSection, opened: HFModel | None, provider: LlavaMimoProvider,
            split: str = "train", dtype: torch.dtype = torch.float32) -> LlavaDataset:
    """The run's LlavaDataset (`data.name: llava`, or the built-in digits' `split`), shaped to the model."""
    vision, language = provider.vision_config, provider.language_config
    if data.name == "digits":
        files = digits_llava_files()
        path, folder, template = files / f"{split}.json", files / "images", "chat"
    else:
        path, folder, template = data.path, data.image_folder, data.template
    prompter = open_prompter(tokenizer_directory(data, model))
    try:
        images = FixedSizeImages(image_processor(model, vision.image_size), (vision.image_size, vision.image_size),
                                 vision.tokens_per_image)
        return LlavaDataset(path, folder, prompter, images, modality=IMAGES, image_token_id=provider.image_token_id,
                            max_seq_len=data.max_seq_len or language.max_seq_len, template=template,
                            on_bad_sample=data.on_bad_sample, vocab_size=language.vocab_size,
                            dtype=dtype, cache_samples=data.cache_samples,
                            allow_paths_outside_image_folder=data.allow_paths_outside_image_folder,
                            max_image_pixels=data.max_image_pixels)
    except ValueError as e:  # DataFileError, TemplateError, a tokenizer that does not fit the model
        raise RunConfigError(f"data: {e}") from None
