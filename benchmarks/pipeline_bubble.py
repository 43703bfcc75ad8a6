"""Pipeline bubbles of mimo's schedule orders, replayed with one GPU's measured layer times (issue 29).

    PYTHONPATH=src python benchmarks/pipeline_bubble.py --measure --json benchmarks/results/pipeline_times_h100.json
    PYTHONPATH=src python benchmarks/pipeline_bubble.py --times benchmarks/results/pipeline_times_h100.json

`--measure` (a GPU, about a minute) times, in bf16 autocast with float32 weights, one micro-batch of the
LLaVA-1.5-7B shapes: a Vicuna-7B decoder layer's forward and backward at `--seq` tokens, the first stage's extra
work (the embedding) and the last stage's (norm, head and loss), and a CLIP ViT-L/336 layer's forward over
`--images` images (the frozen encoder of LLaVA's stage 2 never runs a backward). Without `--measure`, the times
come from `--times` (a file `--measure` wrote) or, failing that, placeholders stated in the output.

The replay (`mimo.training.schedules.simulate`) runs each rank's real order (`interleaved_one_f_one_b`, the
1F1B order `PipelineSchedule` runs, and `forward_only`) with those times, p2p latency `--latency-ms`, and reports
the step's makespan and bubble (the share of rank time spent waiting) for: the 32-layer language model at PP4
with 1F1B and with interleaved VPP2 (chunks of 4 layers) at the same micro-batch counts; and a frozen ViT on its
own two ranks (PP2, forward only) before the language model's PP4, against the language model alone plus the
encoder's forward of one micro-batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mimo.training.metrics import Clock
from mimo.training.schedules import Timeline, forward_only, interleaved_one_f_one_b, simulate

LAYERS, VIT_LAYERS = 32, 24
PLACEHOLDER = {"layer_forward_ms": 6.0, "layer_backward_ms": 12.0, "embedding_forward_ms": 0.3,
               "embedding_backward_ms": 0.6, "head_forward_ms": 6.0, "head_backward_ms": 8.0,
               "vit_layer_forward_ms": 1.5, "source": "placeholders (no --measure, no --times file)"}


def _time_ms(fn, reps: int) -> float:
    """Mean of `reps` CUDA-event-timed calls after two warm-ups."""
    return Clock(torch.device("cuda")).mean_ms(fn, 2, reps)


def measure(seq: int, images: int, reps: int) -> dict[str, Any]:
    """One micro-batch's per-layer times on this GPU (module docstring)."""
    from mimo.models import Decoder, DecoderConfig
    from mimo.models.vit import ViTConfig, ViTEncoder

    config = DecoderConfig.preset("7b", num_layers=3)
    first, middle, last = (Decoder(config, r).cuda() for r in ((0, 1), (1, 2), (2, 3)))
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
    hidden = torch.randn(1, seq, config.hidden_size, device="cuda", requires_grad=True)

    def run(stage: Decoder, **kwargs: torch.Tensor) -> tuple[float, float]:
        def forward() -> torch.Tensor:
            with torch.autocast("cuda", torch.bfloat16):
                out = stage(**kwargs)
            return out[0] if isinstance(out, tuple) else out

        def both() -> None:
            out = forward()
            out.backward(torch.ones_like(out))
        with torch.no_grad():
            fwd = _time_ms(forward, reps)
        return fwd, _time_ms(both, reps) - fwd

    layer = run(middle, hidden=hidden)
    embed = run(first, input_ids=ids)
    head = run(last, hidden=hidden, labels=ids)
    vit = ViTEncoder(ViTConfig.clip_vit_l14_336()).cuda()
    size = vit.config.image_size
    pixels = torch.randn(images, 3, size, size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        vit_ms = _time_ms(lambda: vit(pixels), reps) / vit.config.num_layers_built
    return {"layer_forward_ms": layer[0], "layer_backward_ms": layer[1],
            "embedding_forward_ms": embed[0] - layer[0], "embedding_backward_ms": embed[1] - layer[1],
            "head_forward_ms": head[0] - layer[0], "head_backward_ms": head[1] - layer[1],
            "vit_layer_forward_ms": vit_ms, "seq": seq, "images": images,
            "source": f"measured on {torch.cuda.get_device_name(0)}, torch {torch.__version__}"}


def language_pipeline(times: dict[str, Any], stages: int, chunks: int, microbatches: int, offset: int = 0):
    """Orders, stage numbering and per-stage times of the 32-layer language model over `stages` ranks with
    `chunks` chunks each (virtual stages numbered from `offset`)."""
    per_chunk = LAYERS // (stages * chunks)
    orders = {r: interleaved_one_f_one_b(r, stages, chunks, microbatches) for r in range(stages)}
    stage_of = {(r, c): offset + c * stages + r for r in range(stages) for c in range(chunks)}
    duration = {}
    for v in range(stages * chunks):
        f = per_chunk * times["layer_forward_ms"]
        b = per_chunk * times["layer_backward_ms"]
        if v == 0:
            f, b = f + times["embedding_forward_ms"], b + times["embedding_backward_ms"]
        if v == stages * chunks - 1:
            f, b = f + times["head_forward_ms"], b + times["head_backward_ms"]
        duration[("F", offset + v)], duration[("B", offset + v)] = f, b
    return orders, stage_of, duration


def with_frozen_encoder(times: dict[str, Any], encoder_stages: int, microbatches: int):
    """A frozen ViT on its own `encoder_stages` ranks (forward only) before the language model's PP4."""
    orders, stage_of, duration = language_pipeline(times, 4, 1, microbatches, offset=encoder_stages)
    for e in range(encoder_stages):
        orders[100 + e] = forward_only(microbatches)
        stage_of[(100 + e, 0)] = e
        duration[("F", e)] = VIT_LAYERS // encoder_stages * times["vit_layer_forward_ms"]
    return orders, stage_of, duration


def row(name: str, timeline: Timeline) -> dict[str, Any]:
    return {"row": name, "makespan_ms": timeline.makespan, "bubble": timeline.bubble}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", action="store_true", help="time the layers on this GPU first")
    p.add_argument("--times", type=Path, help="layer times from an earlier --measure")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--images", type=int, default=4, help="images per micro-batch (the ViT's forward)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--latency-ms", type=float, default=0.05)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.measure:
        times = measure(args.seq, args.images, args.reps)
    elif args.times and args.times.exists():
        times = json.loads(args.times.read_text())["times"]
    else:
        times = PLACEHOLDER
    rows = []
    for m in (8, 16):
        plain = simulate(*language_pipeline(times, 4, 1, m), latency=args.latency_ms)
        interleaved = simulate(*language_pipeline(times, 4, 2, m), latency=args.latency_ms)
        rows += [row(f"LM PP4 1F1B, {m} micro-batches", plain),
                 row(f"LM PP4 x VPP2 interleaved, {m} micro-batches", interleaved)]
        rows[-1]["bubble_reduction"] = 1 - interleaved.bubble / plain.bubble
        frozen = simulate(*with_frozen_encoder(times, 2, m), latency=args.latency_ms)
        encoder_forward = VIT_LAYERS * times["vit_layer_forward_ms"] + 2 * args.latency_ms  # 2 hops: ViT 1, LM
        rows.append(row(f"frozen ViT PP2 (forward only) + LM PP4 1F1B, {m} micro-batches", frozen))
        rows[-1]["lm_alone_plus_encoder_forward_ms"] = plain.makespan + encoder_forward
    out = {"benchmark": "pipeline_bubble", "times": times, "latency_ms": args.latency_ms, "rows": rows,
           "command": " ".join(["python", "benchmarks/pipeline_bubble.py", *(argv if argv is not None
                                                                             else sys.argv[1:])])}
    print(f"layer times: {json.dumps(times)}")
    print("| schedule | step ms | bubble | note |")
    print("|---|---|---|---|")
    for r in rows:
        note = (f"{100 * r['bubble_reduction']:.0f}% less bubble than 1F1B" if "bubble_reduction" in r else
                f"LM alone + encoder forward: {r['lm_alone_plus_encoder_forward_ms']:.1f} ms"
                if "lm_alone_plus_encoder_forward_ms" in r else "")
        print(f"| {r['row']} | {r['makespan_ms']:.1f} | {100 * r['bubble']:.1f}% | {note} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
