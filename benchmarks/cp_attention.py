"""The context-parallel attention core on one GPU: a CP rank's share of a packed row, dense mask against flex.

    PYTHONPATH=src python benchmarks/cp_attention.py --json cp_attention.json   # one GPU, under 2 minutes
    PYTHONPATH=src python benchmarks/cp_attention.py --dry-run                  # CPU, tiny (CI)

A packed row of `--documents` documents (default 4, of 40/30/20/10% of the row) of `--lengths` tokens (default
16k, 32k, 64k), split for CP `--cp` (default 2) as training splits it (`split_text`); CP rank `--rank`'s queries
[1, heads, L/CP, d] over every rank's keys [1, heads, L, d], made locally (no collective: the all-gather is not
timed). LLaVA-7B's attention: 32 heads of 128, bf16. Per length, the device time of forward + backward of
(a) `dense`: the explicit-mask SDPA core under `torch.utils.checkpoint` (the core's path before flex, still the
CPU's), (b) `flex`: compiled flex_attention over the micro-batch's block mask (the CUDA path; the block mask's
build is timed apart, `mask_ms`: once per micro-batch, not per layer), (c) `ideal`: CP1's kernel (flash's varlen
through `document_attention`) over the whole row on one GPU, halved: a CP2 rank's fair share. Prints ms and
flex / ideal (the attention's part of CP2's per-GPU speed against CP1: 1.0 is no loss). Each row's first
`--warmup` calls (compilation) are untimed, then the mean of `--steps` calls, CUDA-event timed.
`--dry-run`: CPU, float32, 2 heads of 16, rows of 512-1024, 1 step; flex has no CPU backward, so its row there
is eager flex's forward only (`flex_backward` false): a functional check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))  # llava_speed, beside us

from llava_speed import write_json  # noqa: E402

from mimo.context_parallel import ContextParallelAttention, build_block_mask, split_text  # noqa: E402
from mimo.data.packing import LanguageText  # noqa: E402
from mimo.models.attention import document_attention  # noqa: E402
from mimo.training.metrics import Clock  # noqa: E402

SHARES = (4, 3, 2, 1)  # the documents' relative lengths (cycled for more documents)


def packed_row(length: int, documents: int) -> LanguageText:
    """One packed row of `length` tokens: `documents` documents of SHARES' proportions, the last takes the rest."""
    shares = [SHARES[i % len(SHARES)] for i in range(documents)]
    sizes = [length * s // sum(shares) for s in shares[:-1]]
    sizes.append(length - sum(sizes))
    ids = torch.ones(1, length, dtype=torch.long)
    document_ids = torch.repeat_interleave(torch.arange(documents), torch.tensor(sizes)).unsqueeze(0)
    return LanguageText(ids, ids, None, document_ids)


def rank_attention(text: LanguageText, rank: int, cp: int, device: str) -> ContextParallelAttention:
    """CP rank `rank`'s attention over every rank's keys, its columns and documents on `device` (no group)."""
    return split_text(text, rank, cp).to(device).attention()


def device_ms(call: Callable[[], None], warmup: int, steps: int, device: str) -> float:
    """Mean milliseconds of `call` over `steps` after `warmup` untimed calls, on `device`'s clock."""
    return Clock(torch.device(device)).mean_ms(call, warmup, steps)


def forward_backward(core: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                     backward: bool = True) -> Callable[[], None]:
    """One call of `core` on the leaves `inputs`, and its backward from a fixed output gradient."""
    def call() -> None:
        for t in inputs:
            t.grad = None
        if not backward:
            core(*(t.detach() for t in inputs))
            return
        out = core(*inputs)
        out.backward(torch.ones_like(out))
    return call


def leaves(rows: int, heads: int, lengths: tuple[int, ...], dim: int, dtype: torch.dtype,
           device: str) -> list[torch.Tensor]:
    """Random q [rows, heads, lengths[0], dim], k, v [.., lengths[1], ..] as leaves that take gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(rows, heads, n, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
            for n in (lengths[0], lengths[1], lengths[1])]


def measure(length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One row length's three timings (see the module docstring)."""
    dtype, device = getattr(torch, args.dtype), args.device
    text = packed_row(length, args.documents)
    attention = rank_attention(text, args.rank, args.cp, device)
    local = attention.queries
    q, k, v = leaves(1, args.heads, (local, attention.keys), args.head_dim, dtype, device)
    record: dict[str, Any] = {"length": length, "cp": args.cp, "rank": args.rank, "local_tokens": local,
                              "gathered_tokens": attention.keys, "flex_backward": device == "cuda"}

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return checkpoint(attention.masked_core, q, k, v, use_reentrant=False, preserve_rng_state=False)

    record["dense_ms"] = device_ms(forward_backward(dense, [q, k, v]), args.warmup, args.steps, device)
    record["mask_ms"] = device_ms(lambda: build_block_mask(attention.mask_mod, attention.rows, local, attention.keys,
                                                          device), 0, 1, device)
    blocks = attention.block_mask(device).to_dense()
    record["blocks_kept"] = float(blocks.float().mean())
    flex = (lambda *t: attention.flex_core(*t)) if device == "cuda" else \
        (lambda *t: attention.flex_core(*t, attend=flex_attention))  # eager: no CPU backward, forward only
    record["flex_ms"] = device_ms(forward_backward(flex, [q, k, v], backward=device == "cuda"), args.warmup,
                                  args.steps, device)
    whole = document_attention(text.document_ids.to(device), dtype)
    record["ideal_kernel"] = type(whole).__name__
    wq, wk, wv = leaves(1, args.heads, (length, length), args.head_dim, dtype, device)
    record["ideal_ms"] = device_ms(forward_backward(whole, [wq, wk, wv]), args.warmup, args.steps, device) / args.cp
    record["flex_over_ideal"] = record["flex_ms"] / record["ideal_ms"]
    record["dense_over_flex"] = record["dense_ms"] / record["flex_ms"]
    if device == "cuda":
        record["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line and its defaults (the dry run's tiny ones), checked in one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="packed row lengths (default 16384 "
                        "32768 65536)")
    parser.add_argument("--documents", type=int, default=4, help="documents in the row (default 4)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel size of the split (default 2)")
    parser.add_argument("--rank", type=int, default=0, help="the CP rank whose share is timed (default 0)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 32)")
    parser.add_argument("--head-dim", type=int, default=None, help="head width (default 128)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="(default bfloat16)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per row and core (default 1: "
                        "flex compiles its forward and backward in the first)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per row and core (default 3)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, tiny: a functional check")
    parser.add_argument("--json", type=Path, default=None, help="every record and the environment")
    args = parser.parse_args(argv)
    tiny = args.dry_run
    defaults = {"lengths": [512, 1024] if tiny else [16384, 32768, 65536], "heads": 2 if tiny else 32,
                "head_dim": 16 if tiny else 128, "dtype": "float32" if tiny else "bfloat16",
                "warmup": 0 if tiny else 1, "steps": 1 if tiny else 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = "cpu" if tiny else "cuda"
    if not tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the timings are the GPU's (--dry-run checks the script on the CPU)")
    if args.cp < 1 or not 0 <= args.rank < args.cp:
        parser.error(f"--rank {args.rank} is not a rank of --cp {args.cp} (0 to {args.cp - 1})")
    if args.documents < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--documents and --steps must be at least 1, --warmup at least 0")
    small = [n for n in args.lengths if n < 2 * args.cp * args.documents]
    if small:
        parser.error(f"--lengths {small[0]} is too short: at least 2·CP·documents = {2 * args.cp * args.documents}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Every length's record, printed as a table and written with the environment to --json."""
    args = parse_args(argv)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)",
           "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "dtype": args.dtype,
           "heads": args.heads, "head_dim": args.head_dim, "documents": args.documents,
           "functional_dry_run": args.dry_run}
    print(f"# cp_attention: {env['device']}, torch {env['torch']}, {args.dtype}, {args.heads} heads x "
          f"{args.head_dim}, CP{args.cp} rank {args.rank}, {args.documents} documents", flush=True)
    print(f"{'length':>8} {'dense ms':>10} {'flex ms':>10} {'ideal ms':>10} {'mask ms':>9} {'kept':>6} "
          f"{'flex/ideal':>10} {'dense/flex':>10}", flush=True)
    records = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        for length in args.lengths:
            r = measure(length, args)
            records.append(r)
            print(f"{length:>8} {r['dense_ms']:>10.2f} {r['flex_ms']:>10.2f} {r['ideal_ms']:>10.2f} "
                  f"{r['mask_ms']:>9.2f} {r['blocks_kept']:>6.1%} {r['flex_over_ideal']:>10.2f} "
                  f"{r['dense_over_flex']:>10.2f}", flush=True)
            if args.json:
                write_json(str(args.json), env, records)
    return records


if __name__ == "__main__":
    main()
