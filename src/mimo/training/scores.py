"""Scores of generated answers against reference answers, after whitespace and case normalization.

Exact match: the normalized answer equals the normalized reference. Token accuracy: the words (whitespace-separated
tokens of the normalized texts) that agree position by position, over the longer of the two, so a missing word and
an extra word both cost; both are averaged over samples (each sample weighs the same).
"""

from __future__ import annotations

from collections.abc import Sequence


def normalize(text: str) -> str:
    """Lower case, runs of whitespace as one space, none at the ends."""
    return " ".join(text.lower().split())


def token_accuracy(answer: str, reference: str) -> float:
    """The share of word positions where the normalized answer and reference agree (1 for two empty texts)."""
    said, wanted = normalize(answer).split(), normalize(reference).split()
    longest = max(len(said), len(wanted))
    return 1.0 if longest == 0 else sum(a == b for a, b in zip(said, wanted, strict=False)) / longest


def scores(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """{"exact_match", "token_accuracy"} of (answer, reference) pairs, each the mean over the pairs."""
    if not pairs:
        raise ValueError("no answers to score")
    exact = sum(normalize(a) == normalize(r) for a, r in pairs) / len(pairs)
    tokens = sum(token_accuracy(a, r) for a, r in pairs) / len(pairs)
    return {"exact_match": exact, "token_accuracy": tokens}
