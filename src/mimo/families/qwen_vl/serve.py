"""`mimo generate` for Qwen-VL: the prompt through the chat template as the training data was (`Prompter.message`),
each image at its native resolution through the image processor the model was trained with (`data.image_processor`:
the directory's, with the run's `data.min_pixels` / `data.max_pixels`), its `<|image_pad|>` expanded to its merged
token count, M-RoPE positions as transformers' `get_rope_index`, greedy decoding to an end-of-sequence id: token
for token transformers' `generate(do_sample=False)`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from mimo.config import ConfigFileError
from mimo.families.family import GenerationRequest
from mimo.families.qwen_vl.data import image_processor, open_prompter, tokenizer_directory
from mimo.families.qwen_vl.hf_load import IMAGES
from mimo.families.qwen_vl.provider import QwenVLMimoProvider
from mimo.families.qwen_vl.section import QwenVLSection
from mimo.hf.generate import greedy, stop_ids
from mimo.hf.image import open_image
from mimo.hf.prompt import Prompter
from mimo.models import ModalityBatch
from mimo.models.mrope import get_rope_index


@dataclass(frozen=True)
class Prompt:
    """What `generate` feeds the model: token ids (each image's model image tokens in place), the images packed
    with their grids, the ids it stops at, and the tokenizer that decodes the answer."""

    input_ids: list[int]
    images: ModalityBatch
    eos_ids: list[int]
    prompter: Prompter


def prompt(section: QwenVLSection, provider: QwenVLMimoProvider, request: GenerationRequest) -> Prompt:
    """The request as the model was trained: the run's tokenizer and chat template, its image processing, the EOS
    its answers ended with; a one-line error for what cannot be."""
    directory = tokenizer_directory(request.data, section)
    if directory is None:
        raise ConfigFileError("the model was trained from a preset on data with no tokenizer (synthetic): there is "
                              "no tokenizer to prompt it with; train on LLaVA-format data with data.tokenizer, or "
                              "from a Qwen-VL directory (model.hf)")
    prompter = open_prompter(directory)
    vision = provider.vision_config
    packed = image_processor(request.data, section, vision)([open_image(path) for path in request.media])
    counts = (packed.image_grid_thw.prod(dim=1) // vision.merge_unit).tolist()
    ids = prompter.input_ids(request.prompt, counts, provider.spec.image_token_id, len(request.media))
    images = ModalityBatch(packed.pixel_values, torch.tensor([len(counts)]), packed.image_grid_thw)
    return Prompt(ids, images, stop_ids(section.hf, prompter), prompter)


def generate(model: nn.Module, section: QwenVLSection, provider: QwenVLMimoProvider,
             request: GenerationRequest) -> str:
    """The greedy continuation of the prompt about the images (`prompt`); it stops at the language model's
    max_seq_len, with a warning saying so."""
    asked, limit = prompt(section, provider, request), provider.language_config.max_seq_len
    room = limit - len(asked.input_ids)
    if room < 1:
        raise ConfigFileError(f"--prompt: the prompt is {len(asked.input_ids)} tokens with its images, and the "
                              f"model's max_seq_len is {limit}: no room to generate; shorten the prompt or give "
                              f"smaller images")
    grids, merge = asked.images.item_grids, provider.vision_config.spatial_merge_size
    image_id = provider.spec.image_token_id
    new = greedy(model, asked.input_ids, {IMAGES: asked.images}, min(request.max_new_tokens, room), asked.eos_ids,
                 positions=lambda ids: get_rope_index(ids, grids, merge, image_id)[0])
    if len(new) == room < request.max_new_tokens and new[-1] not in asked.eos_ids:
        warnings.warn(f"stopped after {room} of --max-new-tokens {request.max_new_tokens} tokens: the prompt "
                      f"({len(asked.input_ids)} tokens) and the answer reached the model's max_seq_len of {limit}",
                      stacklevel=2)
    return asked.prompter.decode(new)
