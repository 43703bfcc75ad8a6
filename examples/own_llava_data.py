"""Write a small LLaVA-format data set of your own kind, with a tokenizer made for it, for training on a CPU.

    python examples/own_llava_data.py runs/colors
    mimo train examples/llava_own_data.yaml

`runs/colors` gets `images/` (8×8 PNGs, each a noisy patch of one of six colours), `train.json` and
`held_out.json` in LLaVA's `conversations` form ("<image>\\nwhat color is it ?" → "red"), and `tokenizer/`: a
word-level `tokenizer.json` over the data's words with `<image>`, and a chat template printing each message's
content, Vicuna-style. Nothing is downloaded; needs only mimo's own dependencies.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "black": (10, 10, 10), "white": (245, 245, 245)}
QUESTION = "<image>\nwhat color is it ?"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: "
            "{{ message['content'] }} ASSISTANT:{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}"
            "{% endfor %}")
SPLITS = {"train": 600, "held_out": 120}


def write_images_and_entries(out: Path, rng: random.Random) -> None:
    """Every split's noisy colour patches and their LLaVA entries."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        entries = []
        for i in range(count):
            name = rng.choice(list(COLORS))
            pixels = [tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in COLORS[name]) for _ in range(64)]
            image = Image.new("RGB", (8, 8))
            image.putdata(pixels)
            file = f"{split}_{i:04d}.png"
            image.save(out / "images" / file)
            entries.append({"id": f"{split}-{i}", "image": file, "conversations": [
                {"from": "human", "value": QUESTION}, {"from": "gpt", "value": name}]})
        (out / f"{split}.json").write_text(json.dumps(entries, indent=1))


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the data's words (split at whitespace) and its chat template."""
    words = ["USER:", "ASSISTANT:", *QUESTION.split()[1:], *COLORS]
    vocab = {w: i for i, w in enumerate([*SPECIALS, *dict.fromkeys(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "image_token": "<image>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def main(out: Path) -> None:
    write_images_and_entries(out, random.Random(0))
    write_tokenizer(out / "tokenizer")
    print(f"wrote {out}: {SPLITS['train']} training and {SPLITS['held_out']} held-out samples, and a tokenizer")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/colors"))
