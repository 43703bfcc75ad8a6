"""GEMM speed against row alignment on one GPU: each of the Qwen2.5-VL-7B tower's GEMM shapes (forward, input
gradient, weight gradient) at a width as the model has it and padded to a multiple of 8, with the kernel cuBLAS picks.

Why `mimo.gemm_alignment` exists: a bf16 matrix 3420 wide has rows off 16 bytes, and cuBLAS falls back from its
Hopper kernels. `PYTHONPATH=src python benchmarks/gemm_alignment.py` (CUDA only); results in RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# (K, N) of the tower's linear layers (hidden 1280, MLP 3420) and merger (5120 -> 5120 -> 3584), with the padded MLP
SHAPES = [(1280, 3840), (1280, 1280), (1280, 3420), (1280, 3424), (3420, 1280), (3424, 1280), (5120, 5120),
          (5120, 3584)]


def ms_per_call(fn: Callable[[], torch.Tensor], reps: int = 20) -> float:
    """Mean milliseconds of `fn` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def kernel_of(fn: Callable[[], torch.Tensor]) -> str:
    """The longest CUDA kernel `fn` launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and "Memset" not in e.key]
    return max(kernels, key=lambda e: e.self_device_time_total).key[:60] if kernels else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="12158,9420,2355", help="M: patches (or merged tokens) per micro-batch")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16")
    for m in (int(t) for t in args.tokens.split(",")):
        for k, n in SHAPES:
            x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
            dy = torch.randn(m, n, device=device, dtype=dtype)
            tflop = 2 * m * k * n / 1e12
            cells = []
            products = {"fwd": lambda x=x, w=w: x @ w.t(), "dX": lambda dy=dy, w=w: dy @ w,
                        "dW": lambda dy=dy, x=x: dy.t() @ x}
            for name, fn in products.items():
                ms = ms_per_call(fn)
                cells.append(f"{name} {ms:.3f} ms {tflop / ms * 1e3:.0f} TFLOP/s [{kernel_of(fn)}]")
            print(f"M={m} K={k} N={n}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
