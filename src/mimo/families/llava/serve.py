"""A trained LLaVA out of mimo: `mimo export-hf` (a `LlavaForConditionalGeneration` directory), `mimo generate`
(greedy text about images) and the held-out questions `mimo eval` answers, all with the tokenizer and image
preprocessing the model was trained with (`data.tokenizer_directory`, `data.image_processor`: a preset run's too),
or a Hugging Face directory's own."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mimo.config import ConfigFileError, RunConfigError
from mimo.data.conversation import IMAGE, Conversation, Turn
from mimo.data.digits_llava import digits_llava_files
from mimo.data.questions import HeldOutQuestions
from mimo.data.section import DataSection
from mimo.data.templates import TemplateError, build_template
from mimo.families.family import EvalRequest, GenerationRequest
from mimo.families.llava import data as llava_data
from mimo.families.llava.data import image_processor, open_prompter, tokenizer_directory
from mimo.families.llava.export import Origin, Served, export_llava
from mimo.families.llava.hf_config import LlavaSpec
from mimo.families.llava.provider import IMAGES, LlavaMimoProvider
from mimo.families.llava.section import LlavaSection
from mimo.hf.generate import greedy, stop_ids
from mimo.hf.image import ImageProcessor, open_image
from mimo.hf.prompt import Prompter


def export(model: nn.Module, section: LlavaSection, data: DataSection, provider: LlavaMimoProvider,
           out_dir: Path) -> tuple[Path, str]:
    """Write the whole model as a Hugging Face LLaVA directory, with its run's tokenizer and preprocessing and its
    origin directories' files; a run with no tokenizer is exported with a warning saying so."""
    spec = LlavaSpec(provider.vision_config, provider.language_config, provider.image_token_id,
                     provider.projector_activation, provider.projector_bias)
    origin = Origin(*(Path(d) if d else None for d in (section.hf, section.vision_hf, section.language_hf)))
    tokenizer = _run_tokenizer(section, data)
    if tokenizer is None:
        warnings.warn(f"the run trained on {data.name} data with no tokenizer (model.preset, no data.tokenizer): "
                      f"the directory holds the model alone, which transformers loads, but no tokenizer or "
                      f"processor to prompt it with", stacklevel=2)
    preset_images = ImageProcessor.square(provider.vision_config.image_size)  # an origin directory carries its own
    served = Served(tokenizer, preset_images if section.image_directory is None else None)
    return export_llava(model, spec, out_dir, origin, served=served), "LlavaForConditionalGeneration"


@dataclass(frozen=True)
class Prompt:
    """What `generate` feeds the model: token ids (images expanded to the model's image id), pixels [n, 3, H, W],
    the ids it stops at, and the tokenizer that decodes the answer."""

    input_ids: list[int]
    pixels: torch.Tensor
    eos_ids: list[int]
    prompter: Prompter


def prompt(section: LlavaSection, provider: LlavaMimoProvider, request: GenerationRequest) -> Prompt:
    """The request as the model was trained: the run's tokenizer and template (the chat template through
    `Prompter.message`, training's rendering; a `plain` or `vicuna_v1` run's prompt as its template renders a turn
    before the answer, as `mimo eval` asks it), its image preprocessing, the EOS its answers ended with; a one-line
    error for what cannot be."""
    vision = provider.vision_config
    directory = _run_tokenizer(section, request.data)
    if directory is None:
        raise ConfigFileError("the model was trained from a preset on data with no tokenizer (synthetic): there is "
                              "no tokenizer to prompt it with; train on LLaVA-format data or the digits, or give "
                              "data.tokenizer")
    images = [open_image(path) for path in request.media]
    processor = image_processor(section, vision.image_size)
    pixels = torch.stack([_pixels(image, path, processor, vision.image_size) for image, path in
                          zip(images, request.media, strict=True)])
    prompter = open_prompter(directory)
    template = request.data.template if request.data is not None and request.data.name == "llava" else "chat"
    if template == "chat":
        ids = prompter.input_ids(request.prompt, vision.tokens_per_image, provider.image_token_id, len(request.media))
    else:
        ids = _templated_ids(template, prompter, request.prompt, len(request.media), vision.tokens_per_image,
                             provider.image_token_id)
    return Prompt(ids, pixels, stop_ids(section.text_directory, prompter), prompter)


def _templated_ids(template: str, prompter: Prompter, text: str, images: int, image_tokens: int,
                   image_id: int) -> list[int]:
    """The prompt ids of one user turn as a `plain` / `vicuna_v1` run's template renders it before the answer
    (`Rendered.prompt`: what `LlavaDataset.question` asks); the images before the text when it places none."""
    text = text if IMAGE in text else f"{IMAGE}\n" * images + text
    try:
        rendered = build_template(template, prompter).render(Conversation((Turn("user", text), Turn("assistant", ""))))
    except (TemplateError, ValueError) as e:
        raise ConfigFileError(f"--prompt: the run's data.template {template} cannot render it: {e}") from None
    return prompter.prompt_ids(rendered.prompt, image_tokens, image_id, images, rendered.add_special_tokens)


def generate(model: nn.Module, section: LlavaSection, provider: LlavaMimoProvider, request: GenerationRequest) -> str:
    """The greedy continuation of the prompt about the images (`prompt`); it stops at the language model's
    max_seq_len, with a warning saying so."""
    asked, limit = prompt(section, provider, request), provider.language_config.max_seq_len
    room = limit - len(asked.input_ids)
    if room < 1:
        raise ConfigFileError(f"--prompt: the prompt is {len(asked.input_ids)} tokens with its images, and the "
                              f"model's max_seq_len is {limit}: no room to generate; shorten the prompt")
    new = greedy(model, asked.input_ids, {IMAGES: asked.pixels}, min(request.max_new_tokens, room), asked.eos_ids)
    if len(new) == room < request.max_new_tokens and new[-1] not in asked.eos_ids:
        warnings.warn(f"stopped after {room} of --max-new-tokens {request.max_new_tokens} tokens: the prompt "
                      f"({len(asked.input_ids)} tokens) and the answer reached the model's max_seq_len of {limit}",
                      stacklevel=2)
    return asked.prompter.decode(new)


def questions(section: LlavaSection, opened, provider: LlavaMimoProvider, request: EvalRequest,
              dtype: torch.dtype) -> HeldOutQuestions:
    """A held-out file's questions as the model was trained to read them (its run's tokenizer, template and image
    preprocessing, or a Hugging Face directory's own with its chat template), and the ids its answers end with."""
    dataset = llava_data.dataset(_eval_data(section, request), section, opened, provider, "held_out", dtype)
    return HeldOutQuestions(dataset, stop_ids(section.text_directory, dataset.prompter), dataset.prompter.decode)


def _eval_data(section: LlavaSection, request: EvalRequest) -> DataSection:
    """The data section that reads the request's held-out file: the run's, pointed at the file (its images in
    `request.image_folder`, else the run's image folder, else the file's own folder), with the run's tokenizer;
    with no file, the run's own held-out split (the digits')."""
    run = request.data
    if request.path is None:
        if run is None or run.name != "digits":
            raise ConfigFileError("--data: give the held-out file (LLaVA-format JSON or JSONL) to answer")
        return run
    directory = _run_tokenizer(section, run)
    if directory is None:
        raise ConfigFileError("the model was trained from a preset on data with no tokenizer (synthetic): there is "
                              "no tokenizer to ask it questions with; give data.tokenizer when training")
    folder = request.image_folder or _run_image_folder(run) or request.path.parent
    base = run or DataSection()
    template = request.template or base.template
    try:
        return dataclasses.replace(base, name="llava", path=str(request.path), image_folder=str(folder),
                                   tokenizer=str(directory), template=template)
    except RunConfigError as e:
        raise ConfigFileError(f"--data: {e}") from None


def _run_image_folder(run: DataSection | None) -> Path | None:
    """The folder a run's images were in: data.image_folder, the digits' own, or None (a directory's model)."""
    if run is None or run.name not in ("llava", "digits"):
        return None
    return Path(run.image_folder) if run.name == "llava" else digits_llava_files() / "images"


def _run_tokenizer(section: LlavaSection, data: DataSection | None) -> Path | None:
    """The tokenizer directory the model was trained with (its run's data section), a Hugging Face directory's own
    (`data` None), or None for a run that had none."""
    if data is None:
        return Path(section.text_directory) if section.text_directory else None
    try:
        return tokenizer_directory(data, section)
    except RunConfigError:
        return None


def _pixels(image: Image.Image, path: Path, processor: ImageProcessor, size: int) -> torch.Tensor:
    """One image preprocessed to the tower's input size, or a one-line error naming it."""
    pixels = processor(image)
    if tuple(pixels.shape[-2:]) != (size, size):
        raise ConfigFileError(f"--image {path}: the image preprocessing makes {tuple(pixels.shape[-2:])} images, "
                              f"but the tower takes {size}x{size}")
    return pixels
