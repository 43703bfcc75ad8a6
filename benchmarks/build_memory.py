"""Peak host memory of building a LLaVA preset on one process (meta build, then per-parameter init).

    python benchmarks/build_memory.py [--preset 1b] [--dtype float32]

Prints the parameter bytes, the largest parameter, and the process's peak RSS over its baseline: the
bound to check is peak - baseline <= parameter bytes + one full parameter (the temporary float32 draw).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from mimo.families.llava import LlavaMimoProvider


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    """Build the preset once and report the memory figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    provider = LlavaMimoProvider.preset(args.preset, params_dtype=dtype)
    meta = provider.build_meta_model()
    largest = max(p.numel() for p in meta.parameters())
    n_params = sum(p.numel() for p in meta.parameters())
    del meta
    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    model = provider.provide()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes() - baseline
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = param_bytes + largest * 4 + largest * dtype.itemsize
    gib = 2**30
    print(f"preset {args.preset} ({args.dtype}): {n_params / 1e9:.3f} B parameters, {param_bytes / gib:.2f} GiB")
    print(f"largest parameter: {largest / 1e6:.1f} M elements ({largest * 4 / gib:.3f} GiB as float32)")
    print(f"peak RSS over baseline while building: {peak / gib:.2f} GiB (bound {bound / gib:.2f} GiB); "
          f"built in {seconds:.1f} s")


if __name__ == "__main__":
    main()
