"""The LLaVA family's datasets, from the data and model sections: which tokenizer, which image processing.

The tokenizer is `data.tokenizer` when given, else the model's Hugging Face directory (`model.hf`, or
`model.language_hf`); the image preprocessing is the vision directory's preprocessor config (`model.hf` or
`model.vision_hf`), or for a preset a plain resize to its input size. The built-in digits (`data.name: digits`)
go through the same dataset: PNGs and LLaVA JSON in mimo's cache, mimo's word-level tokenizer, the chat
template.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mimo.config import RunConfigError
from mimo.data.digits_llava import DIGITS_TOKENIZER, cache_root, digits_llava_files
from mimo.data.image_inputs import FixedSizeImages
from mimo.data.llava import LlavaDataset
from mimo.data.scan import HEAD, SCANS, DataFileError, DataScan, RowRules, check_data_file, file_facts, read_rows
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


def check_data(data: DataSection, model: LlavaSection, opened: HFModel | None,
               provider: LlavaMimoProvider) -> DataScan | None:
    """Before any worker starts: a llava run's data (`check_llava_data`, every row of the file: what was found, for
    the caller to judge); the digits need nothing checked here (None)."""
    if data.name != "llava":
        return None
    pixels = [k for k in ("min_pixels", "max_pixels") if getattr(data, k) is not None]
    if pixels:
        raise RunConfigError(f"data.{pixels[0]}: bounds a native-resolution image's pixels (model.family qwen_vl); "
                             f"a LLaVA tower takes one size, its image processor's")
    return check_llava_data(data, open_prompter(tokenizer_directory(data, model)), provider.language_config.max_seq_len,
                            provider.vision_config.tokens_per_image)


def check_llava_data(data: DataSection, prompter: Prompter, max_seq_len: int,
                     tokens_per_image: int | None = None) -> DataScan | None:
    """What every family that reads LLaVA-format data checks before any worker starts: the data file and image
    folder exist, max_seq_len fits the language model (`max_seq_len`), the template suits the tokenizer `prompter`,
    the first samples' share of unknown tokens; with a fixed `tokens_per_image`, every row of the file too
    (`data.scan`: shape, images, tokens), returned; without (native-resolution images, whose tokens depend on their
    size), the file is read whole (UTF-8, JSON) and None returned."""
    if not Path(data.path).is_file():
        raise RunConfigError(f"data.path: {data.path} is not a file (a LLaVA JSON or JSONL file)")
    if not Path(data.image_folder).is_dir():
        raise RunConfigError(f"data.image_folder: {data.image_folder} is not a directory")
    if data.max_seq_len is not None and data.max_seq_len > max_seq_len:
        raise RunConfigError(f"data.max_seq_len: {data.max_seq_len} exceeds the language model's max_seq_len "
                             f"{max_seq_len}; use at most {max_seq_len}")
    try:
        template = build_template(data.template, prompter)
    except TemplateError as e:
        raise RunConfigError(f"data.template: {e}") from None
    rules = RowRules(prompter, template, tokens_per_image or 0, data.max_seq_len or max_seq_len,
                     Path(data.image_folder), data.allow_paths_outside_image_folder)
    try:
        if tokens_per_image is None:
            check_data_file(data.path)
            head, facts = read_rows(Path(data.path))[0][:HEAD], None
        else:
            facts = file_facts(Path(data.path), rules, cache=cache_root() / SCANS)
            head = facts.head
    except DataFileError as e:
        raise RunConfigError(f"data.path: {e}") from None
    if not head:
        raise RunConfigError(f"data.path: {data.path} holds no entries")
    _check_unknown_tokens(data, head, template, prompter)
    return facts.judged(rules) if facts is not None else None


def _check_unknown_tokens(data: DataSection, rows: Sequence[Any], template, prompter: Prompter) -> None:
    """The first samples' share of `<unk>` tokens: warned about when some, refused above
    `data.max_unknown_token_rate` (a tokenizer that lacks the data's words), naming the words."""
    found = unknown_tokens(rows, template, prompter)
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
