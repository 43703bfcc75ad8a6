"""Peak host memory per rank while loading a Hugging Face LLaVA onto a layout (issue 14: at most 1.3x the shard).

    python benchmarks/hf_load_memory.py --preset llava-1.5-7b --dir /tmp/llava-7b --layouts tp2,pp2

Writes the preset's shapes once as a random Hugging Face directory (bfloat16 safetensors shards with an index,
the names `save_pretrained` writes), then for each layout starts one process per rank (gloo, CPU) that builds
its part through the provider (meta build, TP, then each parameter's shard read with `get_slice`) in float32.
A thread samples /proc/self/status every 2 ms: RssAnon (the process's own memory) and RssFile (pages of the
mmapped safetensors files, which the kernel can drop). Reported against the bytes of the rank's shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_random import write_directory  # noqa: E402  (the random directory, shared with llava15.py)

LAYOUTS = {
    "tp2": {"images": {"tensor_model_parallel_size": 2}, "language": {"tensor_model_parallel_size": 2}},
    "pp2": {"images": {"data_parallel_size": 2},
            "language": {"pipeline_model_parallel_size": 2, "data_parallel_size": 1}},
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rank_worker(directory: str, layout: str) -> None:
    """One rank: load its part, print a JSON line with its shard bytes and memory peaks."""
    import torch
    import torch.distributed as dist

    from mimo.config import MimoParallelismConfig
    from mimo.ddp_shards import local_tensor
    from mimo.distributed import DistributedConfig
    from mimo.families.llava import LlavaMimoProvider
    from mimo.families.llava.hf_load import open_llava

    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    base_anon = _status_kb("RssAnon")
    peak = {"anon": base_anon, "file": 0}
    running = True

    def sample() -> None:
        while running:
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            peak["file"] = max(peak["file"], _status_kb("RssFile"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    provider = LlavaMimoProvider(**open_llava(directory).provider_kwargs(),
                                 mimo_parallelism_config=MimoParallelismConfig.from_dict(LAYOUTS[layout]),
                                 params_dtype=torch.float32)
    model = provider.provide_distributed_model(DistributedConfig())
    seconds = time.perf_counter() - start
    running = False
    thread.join()
    shard = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    read = sum(torch.Size(s).numel() for _, s in provider.initial_weights.reads) * 2
    print(json.dumps({"rank": dist.get_rank(), "layout": layout, "shard_gb": shard / 2**30,
                      "read_gb_bf16": read / 2**30, "peak_anon_gb": (peak["anon"] - base_anon) / 2**20,
                      "peak_file_gb": peak["file"] / 2**20, "seconds": seconds}), flush=True)
    dist.destroy_process_group()


def run_layout(directory: Path, layout: str, port: int) -> list[dict]:
    """Start the layout's ranks as processes; their JSON lines."""
    world = 2
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", layout, "--dir", str(directory)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"layout {layout}: a rank failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-1.5-7b")
    parser.add_argument("--dir", required=True, help="where the random Hugging Face directory is (or goes)")
    parser.add_argument("--layouts", default="tp2,pp2")
    parser.add_argument("--json", default=None, help="write the records here too")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank_worker(args.dir, args.worker)
        return
    directory = Path(args.dir)
    start = time.perf_counter()
    write_directory(args.preset, directory)
    print(f"{directory}: written in {time.perf_counter() - start:.0f} s", flush=True)
    records = []
    print("| layout | rank | shard GB (fp32) | read GB (bf16) | peak anon GB | ratio | peak file-backed GB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for i, layout in enumerate(args.layouts.split(",")):
        for r in run_layout(directory, layout, 29611 + i):
            records.append(r)
            print(f"| {layout} | {r['rank']} | {r['shard_gb']:.2f} | {r['read_gb_bf16']:.2f} | "
                  f"{r['peak_anon_gb']:.2f} | {r['peak_anon_gb'] / r['shard_gb']:.2f} | {r['peak_file_gb']:.2f} | "
                  f"{r['seconds']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "records": records}, indent=2))


if __name__ == "__main__":
    main()
