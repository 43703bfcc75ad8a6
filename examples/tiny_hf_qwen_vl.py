"""Write a tiny random Qwen2.5-VL directory and a small LLaVA-format data set for trying mimo on a CPU.

    python examples/tiny_hf_qwen_vl.py runs/tiny-qwen-vl
    mimo train examples/qwen25vl_tiny_sft.yaml

`runs/tiny-qwen-vl/model` holds what a real Qwen2.5-VL directory does: config.json, model.safetensors, a byte-level
BPE tokenizer with Qwen's special tokens (`<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|image_pad|>`,
`<|vision_end|>`, ...), Qwen2.5-VL's own chat template, its image processor's `preprocessor_config.json` (14-px
patches, at most 16 merged tokens an image) and `generation_config.json` (stops at `<|im_end|>`). `runs/tiny-qwen-vl`
gets `images/` (PNGs of many sizes, each a noisy field of one of six colours), `train.json` and `held_out.json` in
LLaVA's `conversations` form ("<image>\\nwhat color is it?" → "red"). The weights are random; the run teaches the
colours. Needs transformers (pip install -e '.[hf]'); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "black": (10, 10, 10), "white": (245, 245, 245)}
QUESTIONS = ("what color is it?", "which colour fills the picture?", "name the color.")
SPLITS = {"train": 480, "held_out": 96}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")
VOCAB = 384  # the model's rows: the tokenizer's ids and room to spare, a multiple of 128 (any TP size divides it)
# Qwen2.5-VL-7B-Instruct's chat template, as its chat_template.json holds it
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# Qwen3-VL's Instruct layout (no default system turn; text parts of any role), without its tool-calling branches
QWEN3_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content in message.content %}{%- if content.type == 'image' or 'image' in content or 'image_url' in "
    "content %}{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# per kind: the transformers classes, the chat template, the tower's shape, M-RoPE's layout, text settings
KINDS = {
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL_TEMPLATE,
                   {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "patch_size": 14,
                    "window_size": 56, "fullatt_block_indexes": [1]}, {"mrope_section": [4, 2, 2]}, {}),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", QWEN3_VL_TEMPLATE,
                 {"depth": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "patch_size": 16,
                  "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
                 {"mrope_section": [4, 2, 2], "mrope_interleaved": True}, {"head_dim": 16}),
}


def tokenizer(corpus: list[str]) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE over `corpus` with Qwen2's pre-tokenizer and Qwen's special tokens (a Qwen2Tokenizer, as
    transformers builds Qwen's)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB - 64, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    return tok


def save_model(out: Path, kind: str = "qwen2_5_vl", corpus: list[str] = (), initializer_range: float = 0.02,
               max_pixels: int = 28 * 28 * 16) -> transformers.PreTrainedModel:
    """A random Qwen-VL model of `kind` saved to `out` with its tokenizer (over `corpus`), chat template, image
    processor (at most `max_pixels`) and generation config; returns the model (eval mode)."""
    config_class, model_class, template, vision, rope, text_extra = KINDS[kind]
    tok = tokenizer([*corpus, "You are a helpful assistant.", "system user assistant", *QUESTIONS, *COLORS])
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 1024,
            "initializer_range": initializer_range, "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **rope}, **text_extra}
    vision = {**vision, "out_hidden_size": 64, "initializer_range": initializer_range}
    config = getattr(transformers, config_class)(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template)
    patch = vision["patch_size"]
    image_processor(patch, min_pixels=(2 * patch) ** 2 * 4, max_pixels=max_pixels).save_pretrained(out)
    return model


def image_processor(patch_size: int, **settings):
    """transformers' Qwen2VLImageProcessor (its PIL backend: no torchvision needed) for `patch_size`-px patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    mean = (0.5, 0.5, 0.5) if patch_size == 16 else None  # Qwen3-VL normalizes to [-1, 1]
    extra = {"image_mean": list(mean), "image_std": list(mean)} if mean else {}
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2, **settings, **extra)


def write_data(out: Path, seed: int = 0, splits: dict[str, int] = SPLITS) -> None:
    """Every split's noisy colour fields (sides 40-160 px, any aspect) and their LLaVA entries (`splits`: how many
    samples each)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        entries = []
        for i in range(count):
            name, width, height = rng.choice(list(COLORS)), rng.randint(40, 160), rng.randint(40, 160)
            noise = torch.randint(-40, 41, (height, width, 3), generator=gen) + torch.tensor(COLORS[name])
            file = f"{split}_{i:04d}.png"
            Image.fromarray(noise.clamp(0, 255).to(torch.uint8).numpy()).save(out / "images" / file)
            entries.append({"id": f"{split}-{i}", "image": file, "conversations": [
                {"from": "human", "value": f"<image>\n{rng.choice(QUESTIONS)}"}, {"from": "gpt", "value": name}]})
        (out / f"{split}.json").write_text(json.dumps(entries, indent=1))


def main(out: Path) -> None:
    """The model directory and the data set under `out`."""
    write_data(out)
    save_model(out / "model")
    print(f"wrote {out}/model (a tiny Qwen2.5-VL), {SPLITS['train']} training and {SPLITS['held_out']} held-out "
          f"samples")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen-vl"))
