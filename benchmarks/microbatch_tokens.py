"""Tokens per micro-batch of `llava15.py`'s stage-2 data, in the order training takes them: for memory planning.

A layer that is not recomputed keeps activations in proportion to its micro-batch's tokens, so a row's peak
comes from its longest micro-batch, not its mean one. This prints both, without a GPU or a model:

    PYTHONPATH=src python benchmarks/microbatch_tokens.py --steps 7 --microbatches 16 32

The samples are `llava15.stage2_entries` with `llava15.py`'s defaults (the 7b preset, its image pool and maximum
length), ordered by mimo's `GlobalBatchSampler` under the stage-2 YAML's batch and seed and cut into contiguous
micro-batches as `MimoBatch.microbatch` cuts them. A sample's tokens are counted as the benchmark's tokenizer makes
them: one a word, the vicuna_v1 template's, and the vision tower's per image; packed rows' rounding up to 128 is
left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llava15  # noqa: E402

from mimo.data.sampler import GlobalBatchSampler  # noqa: E402
from mimo.families.llava import LlavaMimoProvider  # noqa: E402
from mimo.training.run_config import TrainSection  # noqa: E402

STAGE = 2


def sample_tokens(entry: dict[str, Any], image_tokens: int) -> int:
    """One stage-2 sample's tokens: its words, the template's, its image's."""
    turns = len(entry["conversations"]) // 2
    words = sum(len(c["value"].replace("<image>\n", "").split()) for c in entry["conversations"])
    return words + llava15.vicuna_overhead(turns) + image_tokens * ("image" in entry)


def microbatch_tokens(steps: int, microbatches: int) -> list[int]:
    """Every micro-batch's tokens over `steps` global batches, in training's order: the data `llava15.py` writes
    (its defaults: the 7b preset, its image pool, its max length) for the stage's YAML and seed."""
    args = llava15.parse_args(["--stages", str(STAGE)])
    train = llava15.stage_yaml(STAGE)["train"]
    batch, seed = train["global_batch_size"], train.get("seed", TrainSection.seed)
    provider = LlavaMimoProvider.preset(args.preset)
    vocab, image_tokens = provider.language_config.vocab_size, provider.vision_config.tokens_per_image
    entries = llava15.stage2_entries(batch * steps, args.images, vocab, image_tokens, args.max_len, STAGE)
    sampler, size = GlobalBatchSampler(len(entries), batch, seed=seed), batch // microbatches
    return [sum(sample_tokens(entries[i], image_tokens) for i in indices[k:k + size])
            for indices in (sampler.batch_at(0, s) for s in range(steps)) for k in range(0, batch, size)]


def main() -> None:
    """Print the mean and the longest micro-batch for each asked micro-batch count."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=7, help="global batches (llava15.py's --warmup + --steps)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[16, 32], help="micro-batches a step")
    args = p.parse_args()
    for m in args.microbatches:
        tokens = microbatch_tokens(args.steps, m)
        print(f"{m} micro-batches a step: mean {sum(tokens) / len(tokens):.0f} tokens, "
              f"longest {max(tokens)}")


if __name__ == "__main__":
    main()
