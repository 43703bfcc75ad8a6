"""Tiny random Hugging Face models, made by transformers from configs and saved with `save_pretrained`.

Nothing is downloaded: each builder makes a model of a family (CLIP / SigLIP towers; Llama, Mistral, Qwen2
language models; LLaVA around them) with random weights, perturbs every parameter (so biases and norms are
not their trivial initial values and a weight loaded into the wrong place shows), and saves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB, IMAGE_TOKEN = 300, 299
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 8, "patch_size": 2}
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def vision_config(family: str, **overrides: Any):
    """A CLIP or SigLIP vision config of the tiny shape."""
    cls = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}[family]
    return cls(**{**VISION, **overrides})


def text_config(family: str, **overrides: Any):
    """A Llama, Mistral or Qwen2 config of the tiny shape."""
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(**{**TEXT, **overrides})


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (biases start at zero, norms at one: a misplaced one would not show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def llava(vision: str = "clip", text: str = "llama", vision_kw: dict | None = None, text_kw: dict | None = None,
          **llava_kw: Any):
    """A random `LlavaForConditionalGeneration` (eval mode, float32)."""
    config = transformers.LlavaConfig(vision_config=vision_config(vision, **(vision_kw or {})),
                                      text_config=text_config(text, **(text_kw or {})),
                                      image_token_index=IMAGE_TOKEN, **llava_kw)
    torch.manual_seed(0)
    return perturb(transformers.LlavaForConditionalGeneration(config)).eval()


def save_llava(directory: Path, **kw: Any):
    """`llava(**kw)` saved to `directory`; returns the model."""
    model = llava(**kw)
    model.save_pretrained(directory)
    return model


def save_vision(directory: Path, family: str = "clip", **overrides: Any):
    """A random CLIP / SigLIP vision tower saved to `directory`; returns the model."""
    cls = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}[family]
    torch.manual_seed(1)
    model = perturb(cls(vision_config(family, **overrides)), seed=1).eval()
    model.save_pretrained(directory)
    return model


def save_language(directory: Path, family: str = "llama", **overrides: Any):
    """A random causal language model saved to `directory`; returns the model."""
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[family]
    torch.manual_seed(2)
    model = perturb(cls(text_config(family, **overrides)), seed=2).eval()
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(directory)
    return model


def inputs(tokens_per_image: int, batch: int = 2, text: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, text + tokens], pixel_values [B, 3, 8, 8]): one image per sample, after 2 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (batch, text + tokens_per_image), generator=gen)
    ids[:, 2:2 + tokens_per_image] = IMAGE_TOKEN
    pixels = torch.randn(batch, 3, VISION["image_size"], VISION["image_size"], generator=gen)
    return ids, pixels


WORDS = ["USER", "ASSISTANT", ":", "describe", "the", "image", "please"]
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in "
                  "message['content'] %}{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
                  "{{ item['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary: <unk> <s> </s>, words, w7..w298, <image> (299)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in [*WORDS, *(f"w{i}" for i in range(3 + len(WORDS), IMAGE_TOKEN))]:
        vocab[word] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    return fast


def processor(vision: str = "clip", strategy: str = "default", chat_template: str | None = None):
    """A LlavaProcessor over `tokenizer()` and the tower's image processor (8×8 images)."""
    if vision == "clip":
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    else:
        images = transformers.SiglipImageProcessor(size={"height": 8, "width": 8})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=2,
                                       vision_feature_select_strategy=strategy, chat_template=chat_template,
                                       num_additional_image_tokens=1 if vision == "clip" else 0)
