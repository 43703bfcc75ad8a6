"""`mimo eval` against one `mimo generate` process per sample: the same checkpoint, the same questions, one machine.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/eval_speed.py --steps 40 \
        --json benchmarks/results/eval_speed_cpu.json

A digits checkpoint (the tiny preset, `--steps` steps on one process, into a temporary directory; or `--checkpoint`
of a run of your own) answers the first `--samples` questions of the digits' held-out split twice, each as a user
would run it: one `mimo eval CHECKPOINT --data FILE` process (batched greedy decoding with the KV cache), and one
`mimo generate --checkpoint CHECKPOINT --image I --prompt Q` process per question, one after another. Both stop
at `--max-new-tokens` or the end-of-sequence token. Reported: the wall time of each (interpreter start, model load
and answering included: what a user waits for), the speed-up, and whether every answer is the same (it must be:
the run fails otherwise). Issue 26 asks for at least 20x. Speed is measured here, never asserted by a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mimo.data.digits_llava import digits_llava_files

ONE_PROCESS = {"images": {"data_parallel_size": 1}, "language": {"data_parallel_size": 1}}


def mimo(*args: str) -> tuple[float, str]:
    """(seconds, stdout) of one `mimo` command run as a user runs it; its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mimo", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"mimo {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def train_checkpoint(directory: Path, steps: int) -> Path:
    """A digits checkpoint of the tiny preset after `steps` steps on one process."""
    config = {"model": {"preset": "tiny"}, "parallelism": ONE_PROCESS,
              "train": {"steps": steps, "global_batch_size": 32, "num_microbatches": 1, "lr": 0.004,
                        "warmup_steps": 10, "dtype": "float32", "weight_decay": 0.0},
              "data": {"name": "digits", "cache_samples": True, "num_workers": 0},
              "checkpoint": {"interval": 0}, "eval": {"enabled": False}, "log": {"dir": str(directory / "run")}}
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    mimo("train", str(path), "--quiet")
    return directory / "run" / "checkpoints" / f"step_{steps:08d}"


def measure(checkpoint: Path, samples: int, max_new_tokens: int, work: Path) -> dict[str, Any]:
    """Both ways of answering the first `samples` held-out questions: their times and answers."""
    files = digits_llava_files()
    entries = json.loads((files / "held_out.json").read_text())[:samples]
    data = work / "questions.json"
    data.write_text(json.dumps(entries))
    limit = ["--max-new-tokens", str(max_new_tokens)]
    eval_s, printed = mimo("eval", str(checkpoint), "--data", str(data), "--out", str(work / "answers.jsonl"),
                           "--device", "cpu", *limit)
    batched = [json.loads(line)["answer"] for line in (work / "answers.jsonl").read_text().splitlines()]
    one_by_one, generate_s = [], []
    for entry in entries:
        seconds, out = mimo("generate", "--checkpoint", str(checkpoint), "--image", str(files / "images" /
                            entry["image"]), "--prompt", entry["conversations"][0]["value"], *limit)
        generate_s.append(seconds)
        one_by_one.append(out.strip())
    differ = [k for k, (a, b) in enumerate(zip(batched, one_by_one, strict=True)) if a != b]
    if differ:
        raise SystemExit(f"answers differ at questions {differ[:10]}: eval {batched[differ[0]]!r}, generate "
                         f"{one_by_one[differ[0]]!r}")
    return {"samples": samples, "max_new_tokens": max_new_tokens, "eval_s": eval_s, "eval_printed": printed.strip(),
            "generate_s_total": sum(generate_s), "generate_s_each": generate_s,
            "speedup": sum(generate_s) / eval_s, "answers_equal": True}


def main() -> None:
    """Parse the arguments, measure, print a table row and write the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a digits checkpoint (default: trained here)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of the checkpoint made here")
    parser.add_argument("--samples", type=int, default=48, help="held-out questions answered both ways")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else train_checkpoint(work, args.steps)
        record = measure(checkpoint, args.samples, args.max_new_tokens, work)
    record.update({"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": " ".join(sys.argv),
                   "load_average": os.getloadavg()})
    print("| questions | mimo eval (one process) s | mimo generate (one process each) s | speed-up | answers |")
    print("|---|---|---|---|---|")
    print(f"| {record['samples']} | {record['eval_s']:.1f} | {record['generate_s_total']:.1f} "
          f"({record['generate_s_total'] / record['samples']:.2f} each) | **{record['speedup']:.1f}x** | identical |")
    print(record["eval_printed"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
