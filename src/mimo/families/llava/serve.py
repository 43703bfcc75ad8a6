"""A trained LLaVA out of mimo: `mimo export-hf` (a `LlavaForConditionalGeneration` directory) and `mimo generate`
(greedy text about an image, with the tokenizer and image processor of the model's directories)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import nn

from mimo.config import ConfigFileError
from mimo.families.family import GenerationRequest
from mimo.families.llava.export import Origin, export_llava
from mimo.families.llava.hf_config import LlavaSpec
from mimo.families.llava.provider import IMAGES, LlavaMimoProvider
from mimo.families.llava.section import LlavaSection
from mimo.hf.generate import eos_token_ids, greedy
from mimo.hf.image import ImageProcessor
from mimo.hf.prompt import Prompter


def export(model: nn.Module, section: LlavaSection, provider: LlavaMimoProvider, out_dir: Path) -> tuple[Path, str]:
    """Write the whole model as a Hugging Face LLaVA directory, carrying its origin directories' files."""
    spec = LlavaSpec(provider.vision_config, provider.language_config, provider.image_token_id,
                     provider.projector_activation, provider.projector_bias)
    origin = Origin(*(Path(d) if d else None for d in (section.hf, section.vision_hf, section.language_hf)))
    return export_llava(model, spec, out_dir, origin), "LlavaForConditionalGeneration"


def generate(model: nn.Module, section: LlavaSection, provider: LlavaMimoProvider, request: GenerationRequest) -> str:
    """The greedy continuation of the prompt about the image, prompted and stopped as the directories say."""
    if section.text_directory is None:
        raise ConfigFileError("the model was trained from a preset: it has no tokenizer or image processor to "
                              "generate with; train from Hugging Face directories (model.hf)")
    vision = provider.vision_config
    try:
        image = Image.open(request.media)
        image.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigFileError(f"--image {request.media}: cannot read it as an image ({e})") from None
    pixels = ImageProcessor.from_directory(section.image_directory)(image)
    if tuple(pixels.shape[-2:]) != (vision.image_size, vision.image_size):
        raise ConfigFileError(f"{section.image_directory}/preprocessor_config.json makes {tuple(pixels.shape[-2:])} "
                              f"images, but the tower takes {vision.image_size}x{vision.image_size}")
    prompter = Prompter.from_directory(section.text_directory)
    ids = prompter.input_ids(request.prompt, vision.tokens_per_image, provider.image_token_id)
    new = greedy(model, ids, {IMAGES: pixels}, request.max_new_tokens, eos_token_ids(section.text_directory))
    return prompter.decode(new)
