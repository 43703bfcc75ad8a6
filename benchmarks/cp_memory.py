"""The language model's activation bytes per rank under context parallelism, on CPU (gloo): proof the split is real.

For CP 1, 2 and 4 and sequence lengths 2k-32k, each CP rank builds the same tiny decoder (float32, width 64, 2
layers, 4 heads over 2 KV heads), runs one forward with the loss over its chunks of one padded row
(`mimo.context_parallel.split_text`, the step's split) and counts the bytes of every distinct storage autograd
saves for the backward (`torch.autograd.graph.saved_tensors_hooks`), parameters left out. The CP attention keeps
its inputs (q and the gathered K/V) alive for the recompute of its core (`torch.utils.checkpoint`), which no hook
sees: they are counted too. CP 1 is the plain decoder (SDPA's causal kernel, as without CP).

    python benchmarks/cp_memory.py [--lengths 2048 4096 ...] [--cp 1 2 4] [--json out.json]

Prints a Markdown table: saved MB per rank and its ratio to CP 1's at the same length.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # workers import this file as `cp_memory`

import mimo.context_parallel as context_parallel
from mimo.context_parallel import split_text
from mimo.data.packing import LanguageText
from mimo.models import Decoder, DecoderConfig
from mimo.testing import run_distributed

LENGTHS = (2048, 4096, 8192, 16384, 32768)
CP_SIZES = (1, 2, 4)


def decoder(length: int) -> Decoder:
    """The tiny decoder, its rotary table long enough for `length`, seeded alike on every rank."""
    torch.manual_seed(0)
    return Decoder(DecoderConfig.tiny(max_seq_len=length))


def text_of(length: int) -> LanguageText:
    """One padded row of `length` random ids, every position scored."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, length), generator=generator)
    return LanguageText(ids, torch.roll(ids, -1, dims=1))


def saved_bytes(rank: int, world_size: int, length: int) -> dict:
    """This rank's saved activation bytes for one forward with the loss over its chunks (CP = world size)."""
    model = decoder(length)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in parameters:
            storages[ptr] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    real_checkpoint = context_parallel.checkpoint

    def counted_checkpoint(fn, *args, **kwargs):  # its inputs stay alive for the recompute
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)
        return real_checkpoint(fn, *args, **kwargs)

    context_parallel.checkpoint = counted_checkpoint
    text = text_of(length)
    kwargs = {}
    if world_size > 1:
        text = split_text(text, rank, world_size)
        kwargs = text.model_kwargs()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(input_ids=text.input_ids, labels=text.labels, **kwargs)
    seconds = time.perf_counter() - t0
    context_parallel.checkpoint = real_checkpoint
    return {"bytes": sum(storages.values()), "tokens": int(text.input_ids.numel()), "seconds": seconds,
            "loss_sum": float(loss.detach())}


def measure(lengths: tuple[int, ...], cp_sizes: tuple[int, ...]) -> list[dict]:
    """One record per (CP, length): the largest rank's saved bytes, the tokens it holds, the summed loss."""
    worker = importlib.import_module("cp_memory").saved_bytes  # by module name, not __main__: workers import it
    records = []
    for length in lengths:
        for cp in cp_sizes:
            ranks = run_distributed(worker, cp, length, timeout_s=1800, pg_timeout_s=1800)
            records.append({"cp": cp, "length": length, "bytes_per_rank": max(r["bytes"] for r in ranks),
                            "tokens_per_rank": ranks[0]["tokens"], "seconds": max(r["seconds"] for r in ranks),
                            "loss_sum": sum(r["loss_sum"] for r in ranks)})
            print(f"measured CP{cp} at {length}: {records[-1]['bytes_per_rank'] / 2**20:.1f} MB per rank",
                  file=sys.stderr, flush=True)
    return records


def table(records: list[dict]) -> str:
    """Markdown: MB saved per rank, and the ratio to CP 1 at the same length."""
    base = {r["length"]: r["bytes_per_rank"] for r in records if r["cp"] == 1}
    lines = ["| tokens | CP | tokens per rank | saved MB per rank | vs CP1 | forward s |", "|---|---|---|---|---|---|"]
    for r in records:
        ratio = f"{r['bytes_per_rank'] / base[r['length']]:.3f}" if r["length"] in base else "-"
        lines.append(f"| {r['length']} | {r['cp']} | {r['tokens_per_rank']} | {r['bytes_per_rank'] / 2**20:.1f} | "
                     f"{ratio} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, optionally write the records as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--cp", type=int, nargs="+", default=list(CP_SIZES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    records = measure(tuple(args.lengths), tuple(args.cp))
    print(table(records))
    if args.json is not None:
        args.json.write_text(json.dumps({"records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
