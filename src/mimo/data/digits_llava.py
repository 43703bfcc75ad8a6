"""The built-in digits as LLaVA-format files, so the default run trains through the real data path.

`digits_llava_files()` writes scikit-learn's 1797 scans as 8×8 greyscale PNGs and two LLaVA JSON files
(`train.json`, `held_out.json`: the `digits_split` order, so index i is `DigitsDataset`'s sample i) into
`$MIMO_CACHE_DIR/digits-llava-v1` (default `~/.cache/mimo`, or `$XDG_CACHE_HOME/mimo`), once: it writes a
temporary directory and renames it into place, so two runs starting together never see a half-written one.
`DIGITS_TOKENIZER` is mimo's word-level tokenizer for them (a `tokenizers` tokenizer.json shipped in the
package, made by `build_digits_tokenizer`), whose chat template renders
`<bos><image>\\nwhich digit ? seven <eos>` and so the sample `DigitsDataset` makes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from mimo.data.digits import WORDS, DigitsTokenizer, digits_split, load_digit_scans

DIGITS_TOKENIZER = Path(__file__).parent / "tokenizers" / "digits"
CACHE_NAME = "digits-llava-v1"
QUESTION = "<image>\n" + " ".join(DigitsTokenizer.PROMPT)
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }} "
                 "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def build_digits_tokenizer():
    """The word-level tokenizer: `DigitsTokenizer`'s ids 0..15, then `<image>` (16) and `<unk>` (17); words
    split at whitespace, the special tokens as added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(DigitsTokenizer().vocab)}
    vocab["<image>"], vocab["<unk>"] = len(vocab), len(vocab) + 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in (*DigitsTokenizer.SPECIALS, "<image>", "<unk>")])
    return tokenizer


def digits_tokenizer_config() -> dict[str, str]:
    """The tokenizer_config.json shipped beside the tokenizer: special tokens and the chat template."""
    return {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "image_token": "<image>", "chat_template": CHAT_TEMPLATE}


def cache_root() -> Path:
    """Where mimo caches files it makes: $MIMO_CACHE_DIR, else $XDG_CACHE_HOME/mimo, else ~/.cache/mimo."""
    if os.environ.get("MIMO_CACHE_DIR"):
        return Path(os.environ["MIMO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimo"


def digits_llava_files(root: Path | None = None) -> Path:
    """The directory holding `train.json`, `held_out.json` and `images/`, written on first use."""
    root = cache_root() if root is None else root
    final = root / CACHE_NAME
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
    try:
        _write(partial)
        os.rename(partial, final)
    except OSError:
        if not final.is_dir():  # not another run's rename winning the race: a real failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _write(directory: Path) -> None:
    """Every scan as a PNG (grey levels 0..16 scaled to 0..255) and one JSON file per split."""
    scans, digits = load_digit_scans()
    (directory / "images").mkdir()
    for k, scan in enumerate(scans):
        grey = (scan * 255 / 16).round().to(torch.uint8)
        Image.frombytes("L", (8, 8), bytes(grey.flatten().tolist())).save(directory / "images" / f"{k:04d}.png")
    for split in ("train", "held_out"):
        entries = [{"id": f"digits-{k:04d}", "image": f"{k:04d}.png",
                    "conversations": [{"from": "human", "value": QUESTION},
                                      {"from": "gpt", "value": WORDS[int(digits[k])]}]}
                   for k in digits_split(split).tolist()]
        (directory / f"{split}.json").write_text(json.dumps(entries, indent=1))
