"""LLaVA-1.5 stage 1 and stage 2 through `mimo train` at the real 7B shapes: samples/s per GPU for each layout.

    PYTHONPATH=src python benchmarks/llava15.py --out runs/llava15 --layouts yaml --stages 1 --steps 5 \\
        --time-limit 540 --json benchmarks/results/llava15_h200x2.json          # GPUs (see LLAVA15.md)
    PYTHONPATH=src python benchmarks/llava15.py --dry-run --out /tmp/llava15     # tiny, CPU, gloo, 2 processes
    PYTHONPATH=src python benchmarks/llava15.py --out runs/llava15 --layouts one,one+fp8 --stages 2 \
        --stage1-from none --json benchmarks/results/llava15_fp8.json   # FP8 beside bf16, one cold call
    PYTHONPATH=src python benchmarks/llava15.py --compare bf16.json fp8.json   # two calls' rows side by side

Issue 16's GPU measurement. Everything is written once under OUT and reused by later calls:
- OUT/models: random weights at the preset's shapes (7b: CLIP ViT-L/14-336 and Vicuna-7B) as the two local
  Hugging Face directories the examples name (`hf_random.write_pair`: bfloat16 safetensors shards + index,
  CLIP's preprocessor config, and a word-level tokenizer of Vicuna's 32,000 ids in which every word is one
  token and, as in Vicuna's, no `<image>`: mimo adds it at id 32000, where llava-hf puts it).
- OUT/data: `--images` JPEGs (`data_wait.write_images`: photo-like, 640×480 by default, so CLIP's resize and
  crop are real work) and two LLaVA-format files whose token counts are realistic, the words random:
  stage1.json as LLaVA-Pretrain (one image, a caption of about 50 tokens, `CAPTION`), stage2.json as the 665K
  mix (text lengths and image share drawn as `packing.py` draws its instruction mix, split into 1-8 turns; the
  vicuna_v1 template's system prompt and separators count in the text length).
- OUT/runs/stageN-LAYOUT: one `python -m mimo train examples/llava15_stageN.yaml` per stage and layout, the
  YAML as it is but for `--set` of paths, steps (warm-up + timed, log every step, no periodic checkpoint; no
  final one in stage 2, below) and the layout (`LAYOUTS`: parallelism, the language model's DDP/FSDP2, and
  micro-batches so that each language DP rank's micro-batch keeps the YAML's sample count). Stage 2 starts
  from stage 1's checkpoint (`checkpoint.pretrained_checkpoint`, as the recipe does): the first stage-1 row of
  the call, else `--stage1-from`, else a stage-1 run an earlier call left in OUT; with `--stage1-from none`
  from none: the projector at its seeded initial values (a function of train.seed and each parameter's name,
  `mimo.models.init`), so that stage 2 runs alone in one call on a cold machine.

Every row records what it starts from (`start_record`, in the JSON; the table's note for a stage-2 row from no
checkpoint): train.seed, the stage-1 checkpoint, the models' fingerprints (`mimo.hf.load.fingerprint`), SHA-256s
of the data file and the JPEGs, and of the seeded parameters' initial values. The models are drawn from a fixed
seed and the data from fixed seeds, so two cold calls write the same bytes on the same kind of GPU (the GPU's
random numbers depend on its SM count); the records show whether they did.

Before any run, every asked row's config is checked as `mimo validate` checks it (`preflight`): a layout mimo
refuses stops the call at once, naming the row.

Reported per row from `metrics.jsonl` (rank 0 writes it; a step's time is its slowest rank's): samples/s =
global batch × timed steps / the wall time between the last warm-up step's record and the last step's (data
waits, logging and everything else a run does between steps included), per GPU of the layout, against the
anchor (LLaVA-1.5 on 8×A100: stage 1 5.5, stage 2 2.3 samples/s per GPU) and the target (4× that); the mean
step and data-wait time, rank 0's peak memory, each GPU's most memory in use (`GpuMemory`), and every step's
time and loss (the curves for `--steps 200`). The markdown table goes to stdout; `--json` keeps every row,
merged with the rows an earlier call wrote there (same stage and layout: replaced), so split calls fill one
file.

Checkpoints leave out the frozen parts read from Hugging Face directories (`checkpoint.save_frozen_hf_weights`:
false), so at 7B stage 1's holds the projector only (~250 MB with its AdamW moments; 28 GB when every parameter
was saved) and stage 2's all but the CLIP tower (about 81 GB: the language model's weights and AdamW's two
moments): stage-2 rows write none (`checkpoint.final=false`), and a stage-1 row's is
deleted after it unless stage 2 starts from it (`--keep-checkpoints` keeps and writes all). `--time-limit`
stops the call in time: no row starts past it and a running one is stopped at it, its logged steps reported.

A loss curve longer than one call (`--steps 200`) takes `--resume` on every call: a row continues its earlier
run from that run's checkpoint (`mimo train --resume`), and with `--time-limit` it gets its own
`train.exit_duration_in_mins`, early enough (`SAVE_S`) to stop after a step and write a checkpoint before the
limit. The losses are the whole run's; the speed is the call's own timed steps (each call warms up again).

FP8 (issue 28): a layout name with `+fp8` (or `+fp8row`) after it is that layout with
`distributed.language.fp8=tensorwise` (rowwise), its own run directory; `--layouts one,one+fp8` runs both in one
call from the same seed and the same stage-1 checkpoint, and the report ends with each fp8 row against its bf16
row: samples/s ratio and, for a curve (`--steps 200`), the relative difference of their mean loss over the last
50 steps, and whether the two started alike (their start records). Curves of one call per precision, each
written to its own --json on its own cold machine, are compared with `--compare BF16_JSON FP8_JSON` (nothing is
run). FP8 needs bfloat16 and a GPU of compute capability 8.9+: the CPU dry run (float32) refuses it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_wait import write_images  # noqa: E402  (photo-like JPEGs)
from hf_random import tokenizer_word, write_pair  # noqa: E402  (random HF directories)
from packing import INSTRUCTION_MIX, sample_lengths  # noqa: E402  (the instruction-mix length distribution)

from mimo.cli import positive_int  # noqa: E402
from mimo.data.templates import VicunaV1Template  # noqa: E402
from mimo.families.llava import LlavaMimoProvider  # noqa: E402
from mimo.models.init import initial_value, seeding_names  # noqa: E402
from mimo.training.checkpoint import Checkpointer, checkpoint_step, weights_path  # noqa: E402
from mimo.training.plan import plan_model, plan_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STAGES = (1, 2)
# LLaVA-1.5's published run on 8×A100 (samples/s per GPU) and issue 16's target, 4× that on an H200.
ANCHOR = {1: 5.5, 2: 2.3}
TARGET_RATIO = 4.0
CAPTION = {"median": 50.0, "sigma": 0.25, "min": 16}  # stage-1 caption tokens: lognormal about 50
MAX_TURNS = 8  # stage 2: one question/answer pair per 200 text tokens, at most this many
# seconds a resumable row leaves before the call's limit: its workers' start after this process asked for the row
# (their deadline counts from there), one step past the deadline (~4-10 s at 7B), then its checkpoint, written and
# hashed (stage 1: the projector and its AdamW moments, ~250 MB; stage 2: ~81 GB)
SAVE_S = {1: 45.0, 2: 240.0}
START_S = 120.0  # a 7B row's start before its first step: launch, load the weights, compile
LOG_STOPPED = re.compile(r"^mimo train: stopped after step (\d+) ", re.MULTILINE)  # train.exit_duration_in_mins
LOG_WEIGHTS = re.compile(r"^weights from (\S+) \(optimizer", re.MULTILINE)  # mimo train's line (not --quiet)


@dataclass(frozen=True)
class Layout:
    """A candidate layout: each module's parallelism (None: the YAML's), the language model's data-parallel
    kind (None: the YAML's, DDP on the projector in stage 1, FSDP2 on the language model in stage 2), and the
    stages it is a candidate for."""

    gpus: int
    what: str
    images: dict[str, int] | None = None
    language: dict[str, int] | None = None
    language_dp: str | None = None
    stages: tuple[int, ...] = (1, 2)  # where it differs from the others
    to_fit: dict[int, tuple[str, ...]] = field(default_factory=dict)  # per stage: what it needs to fit in memory
    settings: tuple[str, ...] = ()  # more `--set` items of every stage (an fp8 variant's)

    def overrides(self, base: dict[str, Any], stage: int) -> list[str]:
        """`--set` items for stage `stage`'s YAML `base`: the layout, micro-batches keeping each language DP
        rank's micro-batch at the YAML's sample count, and what the stage needs to fit."""
        out = list(self.to_fit.get(stage, ()))
        if self.images is not None:
            out.append(f"parallelism.images={json.dumps(self.images)}")
        if self.language is not None:
            out.append(f"parallelism.language={json.dumps(self.language)}")
            dp_yaml = base["parallelism"]["language"].get("data_parallel_size", 1)
            dp = self.language.get("data_parallel_size", 1)
            out.append(f"train.num_microbatches={base['train']['num_microbatches'] * dp_yaml // dp}")
        if self.language_dp is not None:
            out.append(f"distributed.language.data_parallel={self.language_dp}")
        return out + list(self.settings)


DP1 = {"data_parallel_size": 1}
# stage 2 with the whole of Vicuna-7B training on one GPU: its float32 state is ~104 GiB, and only recomputed
# activations fit beside it (one H200: 118 GB peak, LLAVA15.md)
RECOMPUTE = ("train.recompute_granularity=full",)
TP2 = {"tensor_model_parallel_size": 2, "data_parallel_size": 1}
LAYOUTS: dict[str, Layout] = {
    "yaml": Layout(2, "the YAML's: DP2 (stage 1: both models frozen, DDP on the projector; stage 2: FSDP2 on the "
                      "language model)"),
    "fsdp2": Layout(2, "DP2, FSDP2 on the frozen language model (stage 2's is the YAML's)", language_dp="fsdp",
                    stages=(1,)),
    "tp2": Layout(2, "TP2 for both modules", images=TP2, language=TP2, language_dp="ddp"),
    "colocated": Layout(2, "encoder DP2, language model TP2, on the same two GPUs", language=TP2, language_dp="ddp"),
    "hetero1+1": Layout(2, "encoder on GPU 0, language model on GPU 1", images=DP1,
                        language={"data_parallel_size": 1, "rank_offset": 1}, language_dp="ddp",
                        to_fit={2: RECOMPUTE}),
    "one": Layout(1, "one GPU: both modules on it (stage 2: 16 bytes per language parameter, ~104 GiB, plus "
                     "activations: recomputed)", images=DP1, language=DP1, language_dp="ddp", to_fit={2: RECOMPUTE}),
}


# A layout's name followed by one of these is the same layout with the language model's linear layers in float8
# (issue 28: `--layouts one,one+fp8` runs bf16 and FP8 side by side, from the same seed and stage-1 checkpoint).
FP8_VARIANTS = {"+fp8": "tensorwise", "+fp8row": "rowwise"}
CURVE_TAIL = 50  # an fp8 row's loss is compared with its bf16 row's over this many last steps
NO_STAGE1 = "none"  # --stage1-from none: stage 2 starts with the projector at its seeded initial values


def layout_of(name: str) -> Layout:
    """A layout by name: one of LAYOUTS, or one of them with an `FP8_VARIANTS` suffix (KeyError otherwise)."""
    base, recipe = fp8_variant(name)
    if recipe is None:
        return LAYOUTS[name]
    layout = LAYOUTS[base]
    return replace(layout, what=f"{layout.what}; the language model's linear layers in fp8 {recipe}",
                   settings=(*layout.settings, f"distributed.language.fp8={recipe}"))


def fp8_variant(name: str) -> tuple[str, str | None]:
    """(the base layout's name, the fp8 recipe) of a layout name; (name, None) if it is no fp8 variant."""
    for suffix, recipe in FP8_VARIANTS.items():
        if name.endswith(suffix) and name[:-len(suffix)] in LAYOUTS:
            return name[:-len(suffix)], recipe
    return name, None


def layout_order(name: str) -> tuple[int, str]:
    """Where a layout's rows sort: by its base layout's place in LAYOUTS, the bf16 row first."""
    base, recipe = fp8_variant(name)
    return list(LAYOUTS).index(base), recipe or ""


# -- the model and the data -----------------------------------------------------------------------------------
def stage_yaml(stage: int) -> dict[str, Any]:
    """The example's run config as written."""
    return yaml.safe_load((EXAMPLES / f"llava15_stage{stage}.yaml").read_text())


def random_words(count: int, vocab: int, rng: random.Random) -> str:
    """`count` random one-token words of `hf_random.write_tokenizer`'s vocabulary."""
    return " ".join(tokenizer_word(rng.randrange(3, vocab)) for _ in range(count))


def stage1_entries(count: int, images: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    """LLaVA-Pretrain's form: "<image>" and a short request, then a caption of about 50 tokens."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lengths = sample_lengths(count, CAPTION["median"], CAPTION["sigma"], CAPTION["min"], 4 * int(CAPTION["median"]),
                             gen)
    return [{"id": str(i), "image": f"{i % images:06d}.jpg",
             "conversations": [{"from": "human", "value": "<image>\n" + random_words(4, vocab, rng)},
                               {"from": "gpt", "value": random_words(n, vocab, rng)}]}
            for i, n in enumerate(lengths)]


def vicuna_overhead(turns: int) -> int:
    """Tokens the vicuna_v1 template adds to `turns` question/answer pairs: <s>, the system prompt's words,
    "USER:", "ASSISTANT:" and </s> per pair (each one token of `write_tokenizer`'s)."""
    return 1 + len(VicunaV1Template.SYSTEM.split()) + 3 * turns


def stage2_entry(index: int, text: int, image: str | None, vocab: int, rng: random.Random) -> dict[str, Any]:
    """One 665K-form conversation of about `text` text tokens: 1-8 pairs, a fifth of each pair the question."""
    turns = min(MAX_TURNS, 1 + text // 200)
    words = max(2 * turns, text - vicuna_overhead(turns))
    conversations = []
    for t in range(turns):
        pair = words // turns + (t < words % turns)
        question = max(1, pair // 5)
        prefix = "<image>\n" if image is not None and t == 0 else ""
        conversations += [{"from": "human", "value": prefix + random_words(question, vocab, rng)},
                          {"from": "gpt", "value": random_words(max(1, pair - question), vocab, rng)}]
    entry: dict[str, Any] = {"id": str(index), "conversations": conversations}
    if image is not None:
        entry["image"] = image
    return entry


def stage2_entries(count: int, images: int, vocab: int, image_tokens: int, max_len: int,
                   seed: int) -> list[dict[str, Any]]:
    """The 665K mix's form: `packing.py`'s instruction-mix text lengths, an image on its share of the samples;
    every sample fits `max_len` with its image tokens."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    mix = INSTRUCTION_MIX
    with_image = (torch.rand(count, generator=gen) < mix["image_fraction"]).tolist()
    lengths = sample_lengths(count, mix["median"], mix["sigma"], mix["min_text"], max_len - 8, gen)
    out = []
    for i, (image, n) in enumerate(zip(with_image, lengths, strict=True)):
        n = min(n, max_len - 8 - image_tokens * image)
        out.append(stage2_entry(i, n, f"{i % images:06d}.jpg" if image else None, vocab, rng))
    return out


def write_models(preset: str, models: Path, language_layers: int | None = None) -> None:
    """`hf_random.write_pair` into models/clip and models/vicuna; with CUDA in a child process, so that this
    process never holds a CUDA context (memory on GPU 0) while the runs train."""
    where = (preset, models / "clip", models / "vicuna", language_layers)
    if not torch.cuda.is_available():
        return write_pair(*where)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(write_pair, *where).result()


def write_data(data: Path, args: argparse.Namespace, provider: LlavaMimoProvider, max_len: int) -> None:
    """The JPEGs and the asked stages' files, each written once (a file already there is kept)."""
    folder = data / "images"
    if not (folder / f"{args.images - 1:06d}.jpg").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_images(folder, args.images, args.image_size)
    vocab, tokens = provider.language_config.vocab_size, provider.vision_config.tokens_per_image
    for stage in args.stages:
        path = data / f"stage{stage}.json"
        count = stage_yaml(stage)["train"]["global_batch_size"] if not args.dry_run else args.dry_batch
        count *= args.warmup + args.steps
        if path.is_file() and len(json.loads(path.read_text())) >= count:
            continue
        entries = stage1_entries(count, args.images, vocab, stage) if stage == 1 else \
            stage2_entries(count, args.images, vocab, tokens, max_len, stage)
        path.write_text(json.dumps(entries))


# -- one row: mimo train on a stage and a layout ----------------------------------------------------------------
def row_overrides(stage: int, layout: Layout, args: argparse.Namespace, run_dir: Path,
                  stage1: Path | None) -> list[str]:
    """Everything the row changes in the YAML: paths, steps, the layout (and, dry run, the tiny sizes)."""
    base = stage_yaml(stage)
    models, data = args.out / "models", args.out / "data"
    sets = [f"model.vision_hf={models / 'clip'}", f"model.language_hf={models / 'vicuna'}",
            f"data.path={data / f'stage{stage}.json'}", f"data.image_folder={data / 'images'}",
            f"train.steps={args.warmup + args.steps}", f"log.dir={run_dir}", "log.interval=1", "checkpoint.interval=0"]
    if stage == 2:  # from stage 1's weights; no checkpoint of its own at the end unless asked (81 GB at 7B)
        sets.append(f"checkpoint.pretrained_checkpoint={stage1 or 'null'}")
        sets.append("data.max_unknown_token_rate=1")  # the random vocabulary spells no word of Vicuna's system prompt
        sets += [] if args.keep_checkpoints else ["checkpoint.final=false"]
    if args.dry_run:  # tiny shapes on the CPU: a small batch, float32, no compilation, the tiny model's length
        base["train"].update(global_batch_size=args.dry_batch, num_microbatches=2)
        sets += [f"train.global_batch_size={args.dry_batch}", "train.num_microbatches=2", "train.dtype=float32",
                 "train.compile=false", f"data.max_seq_len={args.max_len}", "data.num_workers=0"]
    return sets + layout.overrides(base, stage) + args.sets


def run_dir_of(out: Path, stage: int, layout: str) -> Path:
    """Where a row's run goes (its log beside it)."""
    return out / "runs" / f"stage{stage}-{layout}"


def run_row(stage: int, name: str, args: argparse.Namespace, stage1: Path | None, deadline: float) -> dict[str, Any]:
    """`mimo train` on the stage's YAML in `name`'s layout (stopped at `deadline`); the row of its metrics.
    With `--resume` the row continues its earlier run from that run's checkpoint, and a deadline ends it with one."""
    layout = layout_of(name)
    run_dir = run_dir_of(args.out, stage, name)
    resumed = resumed_step(run_dir) if args.resume else None
    if resumed is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    sets = row_overrides(stage, layout, args, run_dir, stage1) + stop_before(deadline, stage, args.resume)
    start_from = start_record(stage, name, args, stage1)
    command = [sys.executable, "-m", "mimo", "train", str(EXAMPLES / f"llava15_stage{stage}.yaml"),
               *(a for s in sets for a in ("--set", s)), *(["--resume"] if resumed is not None else [])]
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with log.open("a" if resumed is not None else "w") as out, GpuMemory() as memory:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        error = wait_or_stop(proc, deadline)
    text = log.read_text()
    row = {"stage": stage, "layout": name, "gpus": layout.gpus, "what": layout.what, "overrides": sets,
           "wall_s": time.perf_counter() - start, "log": str(log), "run_dir": str(run_dir),
           "gpu_memory_max_gib": [memory.peaks[i] for i in sorted(memory.peaks)], "resumed_at": resumed,
           "start": start_from}
    row.update(summarize(stage, run_dir, args.warmup, layout.gpus, resumed or 0))
    stopped = LOG_STOPPED.findall(text)
    if stopped and not proc.returncode and row.get("steps_logged", 0) < args.warmup + args.steps:
        row["stopped"] = f"stopped after step {stopped[-1]} at --time-limit: --resume continues"
    if error or proc.returncode:
        row["error"] = error or last_error(text, proc.returncode)
    if stage == 2:
        found = LOG_WEIGHTS.search(text)
        row["pretrained_from"] = found[1] if found else None
    return row


# -- what a row starts from ------------------------------------------------------------------------------------
def start_record(stage: int, name: str, args: argparse.Namespace, stage1: Path | None) -> dict[str, Any]:
    """What a row's weights and data start from, so that rows of two calls (two cold machines) can be told to have
    started alike: train.seed, the stage-1 checkpoint (None: none), the Hugging Face directories' fingerprints
    (`mimo.hf.load.fingerprint`: the models written here, drawn on the GPU), SHA-256s of the data file and the
    JPEGs, and `seeded_values` where no checkpoint fills what the directories do not hold."""
    from mimo.training.run_config import load_run_config

    sets = row_overrides(stage, layout_of(name), args, run_dir_of(args.out, stage, name), stage1)
    plan = plan_model(load_run_config(EXAMPLES / f"llava15_stage{stage}.yaml", sets))
    data = plan.config.data
    record: dict[str, Any] = {
        "seed": plan.config.train.seed, "stage1": str(stage1) if stage == 2 and stage1 else None,
        "models": {p.name: p.fingerprint for p in plan.hf_parts},
        "data_sha256": hashlib.sha256(Path(data.path).read_bytes()).hexdigest(),
        "images_sha256": files_sha256(sorted(Path(data.image_folder).glob("*.jpg")))}
    if record["stage1"] is None:
        record["seeded"] = seeded_values(plan)
    return record


def seeded_values(plan: Any) -> dict[str, Any]:
    """The parameters the run seeds (no Hugging Face directory holds them: the projector), by name, and a SHA-256
    of their initial float32 values, each `mimo.models.init.initial_value` of train.seed and its name alone (so
    the same in every layout and precision: the language model's fp8 conversion renames nothing)."""
    source, digest, names = plan.provider.initial_weights, hashlib.sha256(), []
    for name, param, owner in seeding_names(plan.provider.whole_meta_model()):
        if source is not None and source.check(name, param):
            continue
        digest.update(name.encode())
        digest.update(initial_value(plan.config.train.seed, name, param.shape, owner).numpy().tobytes())
        names.append(name)
    return {"parameters": names, "sha256": digest.hexdigest()}


def files_sha256(paths: list[Path]) -> str:
    """One SHA-256 of the files' names and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def start_note(row: dict[str, Any]) -> str:
    """The table's note on a stage-2 row that starts from no stage-1 checkpoint (empty for any other row)."""
    start = row.get("start") or {}
    if row["stage"] != 2 or start.get("stage1") is not None or "seeded" not in start:
        return ""
    return (f"no stage 1: projector at its seeded initial values (train.seed {start['seed']}, sha256 "
            f"{start['seeded']['sha256'][:12]})")


def start_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Which parts of two rows' `start_record`s differ, in a few words ('' if they agree)."""
    keys = [k for k in ("seed", "stage1", "models", "data_sha256", "images_sha256", "seeded") if a.get(k) != b.get(k)]
    return ", ".join(keys)


class GpuMemory:
    """The most memory each GPU had in use while a row ran, from `nvidia-smi` every 2 s (every process on it:
    CUDA contexts and the caching allocators' reserve included): each GPU's peak, where metrics.jsonl has rank
    0's only (in hetero1+1 the encoder's GPU). Nothing without nvidia-smi."""

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
        while True:
            try:
                lines = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.splitlines()
                for index, mib in (map(int, line.split(",")) for line in lines if line.strip()):
                    self.peaks[index] = max(self.peaks.get(index, 0.0), mib / 1024)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            if self._stop.wait(2.0):
                return


def resumed_step(run_dir: Path) -> int | None:
    """The step a resumed row continues from: its run's newest complete checkpoint's (None: none, start afresh)."""
    checkpoint = Checkpointer(run_dir / "checkpoints").latest() if run_dir.is_dir() else None
    return None if checkpoint is None else checkpoint_step(checkpoint)


def stop_before(deadline: float, stage: int, resumable: bool) -> list[str]:
    """A resumable row's own deadline (`train.exit_duration_in_mins`): it stops after a step and checkpoints in
    time for the call's limit (`SAVE_S`: a 7B checkpoint's write), so that a later `--resume` call continues it."""
    if not resumable or deadline == math.inf:
        return []
    return [f"train.exit_duration_in_mins={max(deadline - SAVE_S[stage] - time.time(), 6.0) / 60:.4f}"]


def wait_or_stop(proc: subprocess.Popen, deadline: float) -> str | None:
    """Wait for `proc`; past `deadline`, stop its whole process group (it and its workers) and say so."""
    try:
        proc.wait(timeout=None if deadline == math.inf else max(1.0, deadline - time.time()))
        return None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "stopped at --time-limit"


def last_error(text: str, code: int) -> str:
    """The run's last error line (mimo's one-line refusals, a worker's exception), or its exit code."""
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"error|Error|rank \d+:", ln)]
    return (lines[-1] if lines else f"exit code {code}")[:400]


def summarize(stage: int, run_dir: Path, warmup: int, gpus: int, resumed: int = 0) -> dict[str, Any]:
    """The row's figures from `metrics.jsonl` (see the module docstring); empty if no step was timed. Losses are
    the whole run's (every call's, for the curve); times are this call's, the steps after `resumed`."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    steps = [r for r in records if r.get("kind") == "train"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    out: dict[str, Any] = {"losses": [r["loss"] for r in steps], "steps_logged": len(steps)}
    ours = [r for r in steps if r["step"] > resumed]
    timed = ours[warmup:]
    if warmup < 1 or not timed:
        return out
    batch = config["train"]["global_batch_size"]
    wall = timed[-1]["time"] - ours[warmup - 1]["time"]
    per_gpu = batch * len(timed) / wall / gpus
    mean = lambda key: sum(r.get(key) or 0.0 for r in timed) / len(timed)  # noqa: E731
    out.update(step_times_s=[r["step_time_s"] for r in steps], global_batch=batch,
               microbatches=config["train"]["num_microbatches"], steps_timed=len(timed),
               samples_per_s=per_gpu * gpus, samples_per_s_per_gpu=per_gpu, vs_anchor=per_gpu / ANCHOR[stage],
               vs_target=per_gpu / (TARGET_RATIO * ANCHOR[stage]), step_s=mean("step_time_s"),
               data_wait_s=mean("data_wait_s"), tokens_per_step=mean("tokens"),
               peak_memory_gb_rank0=max((r.get("peak_memory_gb") or 0.0) for r in steps),
               skipped_samples=steps[-1].get("skipped_samples", 0))
    return out


def rows_asked(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(stage, layout) of every row the call runs: stage 1's first, each layout where it applies."""
    return [(stage, name) for stage in args.stages for name in args.layouts if stage in layout_of(name).stages]


def preflight(args: argparse.Namespace) -> list[str]:
    """Each asked row's config checked as `mimo validate` checks it (keys, layout, micro-batches, the model's
    split, data and tokenizer; stage 2's pretrained checkpoint aside: it may not exist yet) and its world
    against the layout's GPUs, before any GPU time; one line per problem."""
    from mimo.training.run_config import load_run_config

    problems = []
    for stage, name in rows_asked(args):
        sets = row_overrides(stage, layout_of(name), args, run_dir_of(args.out, stage, name), None)
        try:
            config = load_run_config(EXAMPLES / f"llava15_stage{stage}.yaml", sets)
            plan_run(config, config.world_size)
        except ValueError as e:  # RunConfigError, LayoutError: bad input, one line each
            problems.append(f"stage {stage} {name}: {e}")
            continue
        if config.world_size != layout_of(name).gpus:
            problems.append(f"stage {stage} {name}: a world of {config.world_size}, not {layout_of(name).gpus}")
    return problems


# -- the stage-1 checkpoint stage 2 starts from ------------------------------------------------------------------
def stage1_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage-1 run directory."""
    return Checkpointer(run_dir / "checkpoints").latest()


def earlier_stage1(out: Path) -> Path | None:
    """A finished stage-1 run's checkpoint an earlier call left (the YAML layout's first): a run stopped before its
    last step (`--resume` continues it) is no stage 2's source."""
    runs = sorted((out / "runs").glob("stage1-*"), key=lambda p: (p.name != "stage1-yaml", p.name))
    return next((c for c in map(finished_stage1, runs) if c is not None), None)


def last_step(run_dir: Path) -> int | None:
    """The run's last step (its `config.yaml`'s train.steps), None before the run wrote it."""
    config = run_dir / "config.yaml"
    return yaml.safe_load(config.read_text())["train"]["steps"] if config.is_file() else None


def run_finished(run_dir: Path) -> bool:
    """Whether the run logged its last step: under --resume it is not run again (a finished stage 2 keeps only an
    earlier call's stopped checkpoint, which a resume would train on from)."""
    metrics, last = run_dir / "metrics.jsonl", last_step(run_dir)
    if last is None or not metrics.is_file():
        return False
    return last in [json.loads(line).get("step") for line in metrics.read_text().splitlines() if line.strip()]


def finished_stage1(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint if it is of the run's last step."""
    checkpoint, last = stage1_checkpoint(run_dir), last_step(run_dir)
    return checkpoint if checkpoint is not None and checkpoint_step(checkpoint) == last else None


def run_stages(args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """Stage 1 in every asked layout, then stage 2 from one stage-1 checkpoint (`--stage1-from none`: from none);
    rows in that order. At most one stage-1 checkpoint is kept: `--stage1-from`, an earlier call's, or else this
    call's first."""
    seeded = args.stage1_from == NO_STAGE1
    rows, source = [], None if seeded else args.stage1_from or earlier_stage1(args.out)
    for stage, name in rows_asked(args):
        layout = layout_of(name)
        if args.resume and run_finished(run_dir_of(args.out, stage, name)):
            print(f"# stage {stage} {name}: finished in an earlier call (its row stays as that call wrote it)",
                  flush=True)
            continue
        if source is not None and run_dir_of(args.out, stage, name) in source.parents:
            source = None  # this row replaces the run the checkpoint came from
        skip = why_not_run(stage, source, deadline, args.resume, seeded)
        if skip:
            rows.append({"stage": stage, "layout": name, "gpus": layout.gpus, "what": layout.what, "error": skip})
            continue
        row = run_row(stage, name, args, source, deadline)
        rows.append(row)
        if stage == 1:  # under --resume every row's checkpoints stay: a later call continues from them
            source = keep_or_drop(row, source, args.keep_checkpoints or args.resume, wanted=not seeded)
        print(f"# stage {stage} {name}: {describe_row(row)}", flush=True)
    return rows


def why_not_run(stage: int, source: Path | None, deadline: float, resumable: bool = False,
                seeded: bool = False) -> str | None:
    """Why a row cannot start now (None: it can): a resumable row needs time to load and to checkpoint
    (`START_S` + `SAVE_S`) before the limit; stage 2 needs a stage-1 checkpoint unless `seeded` (`--stage1-from
    none`)."""
    left = deadline - time.time()
    if left <= 0:
        return "not run: --time-limit reached"
    if resumable and left < START_S + SAVE_S[stage]:
        return f"not run: {left:.0f} s left before --time-limit, too few to load, train a step and checkpoint"
    if stage == 2 and source is None and not seeded:
        return "no stage-1 checkpoint (run stage 1 first, or give --stage1-from, or --stage1-from none)"
    return None


def keep_or_drop(row: dict[str, Any], source: Path | None, keep_all: bool, wanted: bool = True) -> Path | None:
    """After a stage-1 row: its checkpoint becomes stage 2's source if there is none yet (and stage 2 `wanted` one),
    else it is deleted (the projector's ~250 MB at 7B) unless `keep_all`; the source from now on. A row stopped
    before its last step keeps its checkpoint for the call that resumes it, and is no stage 2's source: stage 2
    starts from a finished stage 1."""
    if "stopped" in row:
        return source
    checkpoint = finished_stage1(Path(row["run_dir"]))  # a failed row's run may hold an earlier call's stopped one
    if wanted and source is None and checkpoint is not None:
        row["stage1_checkpoint"] = str(checkpoint)
        return checkpoint
    if not keep_all:
        shutil.rmtree(Path(row["run_dir"]) / "checkpoints", ignore_errors=True)
    return source


# -- the report -------------------------------------------------------------------------------------------------
def describe_row(row: dict[str, Any]) -> str:
    """One line: the row's speed, or its error."""
    speed = f"{row['samples_per_s_per_gpu']:.3g} samples/s/GPU" if "samples_per_s_per_gpu" in row else "no timed step"
    return speed + (f" ({row['error']})" if "error" in row else "") + \
        (f", {row['wall_s']:.0f} s wall" if "wall_s" in row else "")


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table (a row per stage and layout) and its notes."""
    lines = ["| stage | layout | GPUs | micro-batches | step s | data wait s | samples/s | samples/s/GPU | x anchor "
             "| x target | peak GB (rank 0) | GPU GiB (nvidia-smi) | steps timed | note |", "|" + "---|" * 14]
    for r in sorted(rows, key=lambda r: (r["stage"], *layout_order(r["layout"]))):
        lines.append("| " + " | ".join([
            str(r["stage"]), r["layout"], str(r["gpus"]), _f(r.get("microbatches")), _f(r.get("step_s")),
            _f(r.get("data_wait_s")), _f(r.get("samples_per_s")), _f(r.get("samples_per_s_per_gpu")),
            _f(r.get("vs_anchor")), _f(r.get("vs_target")), _f(r.get("peak_memory_gb_rank0")),
            " / ".join(f"{g:.0f}" for g in r.get("gpu_memory_max_gib", [])) or "-", _f(r.get("steps_timed")),
            "; ".join(filter(None, [r.get("error", r.get("stopped", "")), start_note(r)]))]) + " |")
    lines += ["", f"Anchor: LLaVA-1.5 on 8xA100, stage 1 {ANCHOR[1]}, stage 2 {ANCHOR[2]} samples/s per GPU; "
              f"target {TARGET_RATIO:g}x: {TARGET_RATIO * ANCHOR[1]:g} and {TARGET_RATIO * ANCHOR[2]:g}.",
              "Layouts: " + "; ".join(f"{n}: {layout_of(n).what}" for n in dict.fromkeys(r["layout"] for r in rows))]
    return "\n".join(lines + fp8_comparisons(rows))


def fp8_comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """Each fp8 row against the bf16 row of its base layout and stage: samples/s, and the relative difference of
    their mean loss over the last CURVE_TAIL steps (issue 28: stage 2 >= 1.2x, losses within 1%)."""
    out = []
    for r in rows:
        base_name, recipe = fp8_variant(r["layout"])
        base = next((b for b in rows if b["stage"] == r["stage"] and b["layout"] == base_name), None)
        if recipe is None or base is None:
            continue
        line = f"stage {r['stage']} {r['layout']} vs {base_name}:"
        if r.get("samples_per_s") and base.get("samples_per_s"):
            line += f" samples/s x{r['samples_per_s'] / base['samples_per_s']:.3f};"
        tail = min(CURVE_TAIL, len(r.get("losses", [])), len(base.get("losses", [])))
        if tail:
            mine, theirs = (sum(x["losses"][-tail:]) / tail for x in (r, base))
            line += (f" mean loss over the last {tail} steps {mine:.4f} vs {theirs:.4f}, relative difference "
                     f"{abs(mine - theirs) / abs(theirs):.2%}")
        if "start" in r and "start" in base:
            differ = start_difference(r["start"], base["start"])
            line += f"; started apart: {differ} differ" if differ else "; same start (seed, models, data, seeds)"
        out.append(line)
    return [""] + out if out else []


def merged_rows(path: Path | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` over those an earlier call wrote to `path` (same stage and layout: this call's row wins)."""
    if path is None or not path.is_file():
        return rows
    return rows_over(json.loads(path.read_text())["rows"], rows)


def rows_over(earlier: list[dict[str, Any]], later: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`earlier`'s rows that `later` has not (by stage and layout), then `later`'s."""
    ours = {(r["stage"], r["layout"]) for r in later}
    return [r for r in earlier if (r["stage"], r["layout"]) not in ours] + later


def compare(paths: list[Path]) -> dict[str, Any]:
    """The rows of earlier calls' --json files, merged in order; their table and fp8 comparisons printed."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            rows = rows_over(rows, json.loads(path.read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"llava15.py: error: --compare {path}: not a --json file of this script ({e!r}): give "
                             f"the files earlier calls wrote") from None
    print(markdown(rows), flush=True)
    return {"rows": rows}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on and with."""
    cuda = torch.cuda.is_available() and not args.dry_run
    return {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else "CPU",
            "preset": args.preset, "language_layers": args.language_layers, "warmup": args.warmup,
            "steps": args.steps, "images": args.images,
            "image_size": list(args.image_size), "dry_run": args.dry_run,
            "anchor_samples_per_s_per_gpu": ANCHOR, "target_ratio": TARGET_RATIO}


# -- the command line -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/llava15"), help="models, data and runs (reused)")
    p.add_argument("--layouts", default="yaml", help=f"comma separated, of {list(LAYOUTS)}, each also with "
                   f"{' or '.join(FP8_VARIANTS)} after it (its language model in fp8: `one,one+fp8`)")
    p.add_argument("--stages", default="1,2", help="1, 2 or 1,2")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; dry run 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; dry run 2)")
    p.add_argument("--images", type=int, default=None, help="JPEGs in the pool (default 512; dry run 8)")
    p.add_argument("--image-size", default=None, help="WxH of the JPEGs (default 640x480; dry run 64x48)")
    p.add_argument("--stage1-from", type=Path, default=None, help="stage 2's pretrained checkpoint (default: "
                   "this call's first stage-1 row, else a stage-1 run an earlier call left in OUT); `none`: "
                   "none, the projector at its seeded initial values (stage 2 alone in one call, from the seed)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole call (rows past it are "
                   "not started; a running one is stopped, its logged steps reported)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every row's checkpoints")
    p.add_argument("--resume", action="store_true", help="rows continue their earlier calls' runs from their "
                   "checkpoints, and stop at --time-limit with one (a curve longer than one call)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="a `mimo train --set` for every row, after the layout's (repeatable), e.g. "
                        "train.recompute_granularity=full")
    p.add_argument("--json", type=Path, default=None, help="write (merge) the rows here")
    p.add_argument("--compare", type=Path, nargs="+", metavar="JSON", default=None, help="run nothing: print the "
                   "table and the fp8 comparisons of the rows these --json files hold (a later file's row replaces "
                   "an earlier's of the same stage and layout): the curves of two calls, bf16's and fp8's")
    p.add_argument("--language-layers", type=positive_int, default=None, help="write Vicuna-7B with only its "
                   "first N decoder layers (default: all 32; fewer fit an 80 GB GPU: not the issue's row, a ratio "
                   "at its shapes); into a fresh --out, the models folder is reused as written")
    p.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU (gloo, 2 processes, float32, no "
                   "compilation, global batch 8): seconds; a functional check, not a measurement")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.preset = "tiny" if dry else "7b"
    args.dry_batch = 8
    args.warmup = (1 if dry else 2) if args.warmup is None else args.warmup
    args.steps = (2 if dry else 10) if args.steps is None else args.steps
    args.images = args.images or (8 if dry else 512)
    args.image_size = tuple(int(v) for v in (args.image_size or ("64x48" if dry else "640x480")).split("x"))
    args.layouts = [n for n in args.layouts.split(",") if n]
    args.stages = sorted({int(s) for s in args.stages.split(",") if s})
    unknown = sorted(n for n in args.layouts if fp8_variant(n)[1] is None and n not in LAYOUTS)
    if unknown:
        p.error(f"--layouts: unknown {unknown}; layouts are {list(LAYOUTS)}, each also with "
                f"{' or '.join(FP8_VARIANTS)} (its language model in fp8)")
    if not set(args.stages) <= set(STAGES) or not args.stages:
        p.error(f"--stages: give 1, 2 or 1,2, got {args.stages}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first timed step is measured from the warm-up's end)")
    if str(args.stage1_from) == NO_STAGE1:
        args.stage1_from = NO_STAGE1
    elif args.stage1_from is not None:
        args.stage1_from = weights_path(args.stage1_from)
        if not (args.stage1_from / "COMPLETE").is_file():
            p.error(f"--stage1-from {args.stage1_from}: not a complete checkpoint (give a step_N directory or a "
                    f"run directory holding one)")
    args.out = args.out.resolve()
    args.max_len = min(stage_yaml(1)["data"]["max_seq_len"],  # the YAMLs' 2048, or the tiny model's 256
                       LlavaMimoProvider.preset(args.preset).language_config.max_seq_len)
    return args


def main(argv: list[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write what is missing, run the rows, print the table, write the JSON; (the report, this call's rows)."""
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare), []
    start = time.time()
    deadline = start + args.time_limit if args.time_limit else math.inf
    provider = LlavaMimoProvider.preset(args.preset)
    write_models(args.preset, args.out / "models", args.language_layers)
    write_data(args.out / "data", args, provider, args.max_len)
    print(f"# models and data in {args.out}: ready after {time.time() - start:.0f} s", flush=True)
    problems = preflight(args)
    if problems:
        print("\n".join(f"llava15.py: error: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(2)
    rows = run_stages(args, deadline)
    report = {"env": environment(args), "rows": merged_rows(args.json, rows)}
    text = markdown(report["rows"])
    if args.dry_run:
        text = "CPU dry run at tiny shapes: a functional check, not a measurement.\n\n" + text
    print("\n" + text, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report, rows


if __name__ == "__main__":
    _, called = main()
    sys.exit(1 if any("error" in r for r in called) else 0)
