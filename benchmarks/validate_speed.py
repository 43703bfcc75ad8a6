"""How long the check of a whole LLaVA-format file takes (`mimo validate`, and `mimo train`'s parent before launch).

    PYTHONPATH=src python benchmarks/validate_speed.py                        # 665k rows (1.2 GB), the CPUs here
    PYTHONPATH=src python benchmarks/validate_speed.py --rows 2000 --workers 1  # a dry run, seconds

Data: a generated file of `--rows` rows like LLaVA-Instruct-665K's (`llava_v1_5_mix665k.json`, 1.03 GB for 665k
rows): 45% VQA-style rows (1-10 short question/answer turns, "Answer the question using a single word or phrase."),
40% LLaVA-Instruct conversations and descriptions (1-5 turns of 25-90-word answers), 15% ShareGPT-style text-only
rows (1-4 turns of 40-200-word answers); words drawn Zipf-like from 3000 made-up ones. 4096 distinct rows are made
and repeated with their own ids and image names, which point at `--images` tiny PNGs in 5 folders (existence is what
is checked). The tokenizer is a byte-level BPE (GPT-2's pre-tokenizer, as Llama-3's and Qwen's) of 32k ids trained
on the rows, with `<image>`; the template `--template` (vicuna_v1, LLaVA-1.5's; or chat, ChatML through Jinja).

Timed, wall and CPU (this process's and the forked scanners'): the cold check, `scan.file_facts` into an empty
cache (the file read and parsed once, every row's shape and tokens over `--workers` forked processes, default the
CPUs here, the facts stored), then the warm one (the facts read back from the cache: `mimo train` after `mimo
validate`, a `--resume`), each followed by `RowFacts.judged` (every image looked up, every length against
max_seq_len). Printed as one JSON line after the summary `mimo validate` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import tempfile
import time
from pathlib import Path

from PIL import Image

from mimo.data.scan import RowRules, file_facts
from mimo.data.templates import build_template
from mimo.hf.prompt import Prompter

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")


class Rows:
    """Made-up rows of LLaVA-665K's kinds (see the module docstring)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.words = ["".join(self.rng.choice(string.ascii_lowercase) for _ in range(self.rng.randint(2, 9)))
                      for _ in range(3000)]

    def sentence(self, n: int) -> str:
        return " ".join(self.words[min(int(self.rng.paretovariate(1.1)) - 1, 2999)] for _ in range(n))

    def row(self) -> dict:
        kind = self.rng.random()
        if kind < 0.45:
            turns = [(self.sentence(self.rng.randint(5, 12)) + "?\nAnswer the question using a single word or phrase.",
                      self.sentence(self.rng.randint(1, 3))) for _ in range(self.rng.randint(1, 10))]
        elif kind < 0.85:
            turns = [(self.sentence(self.rng.randint(8, 20)) + "?", self.sentence(self.rng.randint(25, 90)) + ".")
                     for _ in range(self.rng.randint(1, 5))]
        else:
            turns = [(self.sentence(self.rng.randint(10, 60)), self.sentence(self.rng.randint(40, 200)))
                     for _ in range(self.rng.randint(1, 4))]
        image = kind < 0.85
        conversations = []
        for k, (question, answer) in enumerate(turns):
            value = f"<image>\n{question}" if image and k == 0 else question
            conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
        return {"image": True, "conversations": conversations} if image else {"conversations": conversations}


def write_data(out: Path, rows: int, images: int) -> tuple[Path, list[dict]]:
    """The data file (rows cycling through up to 4096 distinct ones, each with its id and image name) and the
    images."""
    made = Rows()
    pool = [made.row() for _ in range(min(4096, rows))]
    png = out / "one.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png)
    names = [f"{FOLDERS[k % len(FOLDERS)]}/{k:012d}.png" for k in range(images)]
    for name in names:
        (out / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(png, out / "images" / name)
    path = out / "data.json"
    with path.open("w") as f:
        f.write("[")
        for i in range(rows):
            row = dict(pool[i % len(pool)])
            row = {"id": str(i), **({"image": names[i % images]} if "image" in row else {}),
                   "conversations": row["conversations"]}
            f.write(("," if i else "") + json.dumps(row))
        f.write("]")
    return path, pool


def tokenizer(out: Path, pool: list[dict], template: str) -> Prompter:
    """A byte-level BPE of 32k ids trained on the rows' text, saved as a directory, read as mimo reads one."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [turn["value"] for row in pool for turn in row["conversations"]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32000, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    directory = out / "tokenizer"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if template == "chat":
        config["chat_template"] = CHATML
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return Prompter.from_directory(directory)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--template", choices=("vicuna_v1", "chat"), default="vicuna_v1")
    parser.add_argument("--workers", type=int, default=None, help="scanning processes (default: the CPUs here)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        path, pool = write_data(out, args.rows, args.images)
        prompter = tokenizer(out, pool, args.template)
        made = time.perf_counter() - t0
        rules = RowRules(prompter, build_template(args.template, prompter), 576, args.max_seq_len, out / "images")
        cold, cold_cpu, scan = timed(lambda: file_facts(path, rules, args.workers, out / "cache").judged(rules))
        warm, warm_cpu, again = timed(lambda: file_facts(path, rules, args.workers, out / "cache").judged(rules))
        assert again == scan
        print(scan.summary())
        print(json.dumps({"rows": scan.rows, "file_mb": round(path.stat().st_size / 1e6), "template": args.template,
                          "workers": args.workers or len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
                          "load_1min": round(os.getloadavg()[0], 1), "made_s": round(made, 1),
                          "cold_s": round(cold, 1), "cold_cpu_s": round(cold_cpu, 1), "warm_s": round(warm, 1),
                          "warm_cpu_s": round(warm_cpu, 1), "mean_tokens": round(sum(scan.lengths) / len(scan.lengths)),
                          "bad_rows": scan.bad_rows}))


def timed(work):
    """(wall seconds, CPU seconds of this process and its children, result) of `work()`."""
    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    result = work()
    return time.perf_counter() - t0, time.process_time() - c0 + children_cpu() - k0, result


if __name__ == "__main__":
    main()
