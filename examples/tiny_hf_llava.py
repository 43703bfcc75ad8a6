"""Write a tiny random Hugging Face LLaVA directory (CLIP + Llama) for trying mimo's HF commands on a CPU.

    python examples/tiny_hf_llava.py runs/tiny-llava-hf

Needs transformers (pip install -e '.[hf]'); nothing is downloaded. The directory holds what a real one does:
config.json, model.safetensors, a word-level tokenizer.json with <image>, the processor configs, a
chat template; plus photo.png to generate about. The weights are random, so the words are too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

VOCAB, IMAGE_TOKEN = 300, 299
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
            "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """<unk> <s> </s>, a few words, w10..w298, <image>: one token per word."""
    words = ["<unk>", "<s>", "</s>", "USER", "ASSISTANT", ":", "describe", "the", "image", "please"]
    vocab = {w: i for i, w in enumerate([*words, *(f"w{i}" for i in range(len(words), IMAGE_TOKEN)), "<image>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def main(out: Path) -> None:
    """Save the model, its processor and a photo into `out`."""
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                    num_attention_heads=4, image_size=8, patch_size=2),
        text_config=transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256),
        image_token_index=IMAGE_TOKEN)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(out)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=2,
                                vision_feature_select_strategy="default", chat_template=TEMPLATE,
                                num_additional_image_tokens=1).save_pretrained(out)
    Image.effect_mandelbrot((64, 48), (-2.0, -1.2, 1.0, 1.2), 100).convert("RGB").save(out / "photo.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llava-hf"))
