"""Held-out evaluation on one process with a whole (unwrapped) MimoModel: answers by batched greedy decoding with
the KV cache (`mimo.models.generation`), scored against the references (`training.scores`), and the mean per-token
loss. `mimo eval` and the evaluation during training both answer through `answer_questions`, so a checkpoint's
scores are the same wherever they are computed, and each answer is the one `mimo generate` gives for its question."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimo.data import BadSample, MimoBatch, SkippedSample
from mimo.data.positions import MRopePositions
from mimo.data.questions import HeldOutQuestions, Question
from mimo.models import MimoModel, ModalityBatch
from mimo.models.generation import greedy_decode
from mimo.training.scores import scores


class HeldOutError(ValueError):
    """Held-out data with nothing to evaluate: every entry a bad sample."""


@dataclass(frozen=True)
class Answer:
    """One question's generated answer next to its reference (`index`: the entry's place in the file)."""

    index: int
    question: str
    reference: str
    answer: str
    name: str | None = None

    def record(self) -> dict[str, Any]:
        """The answer as a JSON object (a line of the answers file)."""
        named = {} if self.name is None else {"id": self.name}
        return {"index": self.index, **named, "question": self.question, "reference": self.reference,
                "answer": self.answer}


@dataclass(frozen=True)
class Answers:
    """Every question's answer, in file order, and the entries that could not be asked."""

    answers: list[Answer]
    skipped: list[SkippedSample]

    def scores(self) -> dict[str, float]:
        """Exact match and token accuracy over the answers (`training.scores`)."""
        return scores([(a.answer, a.reference) for a in self.answers])

    def summary(self, source: str) -> str:
        """The scores in one line (`mimo eval`'s and a training run's), naming the first question left out."""
        scored = self.scores()
        skipped = f"; {len(self.skipped)} skipped, the first: {self.skipped[0].reason}" if self.skipped else ""
        return (f"exact match {scored['exact_match']:.1%}, token accuracy {scored['token_accuracy']:.1%} "
                f"({len(self.answers)} questions of {source}{skipped})")

    def write(self, path: Path) -> None:
        """One JSON line per answer: index (and id), question, reference, answer."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(a.record(), ensure_ascii=False) + "\n" for a in self.answers))


WINDOW = 16  # batches of questions read ahead and sorted by length together (bounds the images held in memory)


def answer_questions(model: MimoModel, held_out: HeldOutQuestions, max_new_tokens: int = 32,
                     batch_size: int = 32) -> Answers:
    """Every question's greedy answer, up to an end-of-sequence id, `max_new_tokens` or the model's max_seq_len
    (as `mimo generate` stops), in left-padded batches of prompts of similar lengths (sorted within windows of
    `WINDOW` batches read in file order) on the model's device. Questions that cannot be asked (`BadSample`) are
    left out and listed."""
    model.eval()
    answers, skipped, size = [], [], len(held_out.dataset)
    for first in range(0, size, WINDOW * batch_size):
        asked = []
        for index in range(first, min(first + WINDOW * batch_size, size)):
            try:
                asked.append((index, held_out.dataset.question(index)))
            except BadSample as bad:
                skipped.append(bad.record)
        asked.sort(key=lambda pair: len(pair[1].input_ids))  # similar lengths together: little padding
        for start in range(0, len(asked), batch_size):
            chunk = asked[start:start + batch_size]
            rows = _answer_batch(model, [q for _, q in chunk], max_new_tokens, held_out.eos_ids)
            answers += [Answer(index, q.text, q.reference, held_out.decode(row), q.name)
                        for (index, q), row in zip(chunk, rows, strict=True)]
    if not answers:
        raise HeldOutError(f"no question of the held-out data could be asked; the first: {skipped[0].reason}"
                           if skipped else "the held-out data holds no question")
    return Answers(sorted(answers, key=lambda a: a.index), skipped)


def _answer_batch(model: MimoModel, questions: Sequence[Question], max_new_tokens: int,
                  eos_ids: Sequence[int]) -> list[list[int]]:
    """Each question's generated ids up to its first end-of-sequence id (kept) or its own cap: `max_new_tokens`
    within the model's max_seq_len. The batch decodes to its smallest cap; a row cut there before its own cap is
    decoded again alone, so no answer depends on the batch it was in."""
    limit = model.language_model.config.max_seq_len
    caps = [min(max_new_tokens, limit - len(q.input_ids)) for q in questions]
    rows = [_until_end(row, eos_ids) for row in _decode(model, questions, min(caps), eos_ids)]
    for k, (row, cap) in enumerate(zip(rows, caps, strict=True)):
        if len(row) == min(caps) < cap and row[-1] not in eos_ids:
            rows[k] = _until_end(_decode(model, [questions[k]], cap, eos_ids)[0], eos_ids)
    return rows


def _decode(model: MimoModel, questions: Sequence[Question], max_new_tokens: int,
            eos_ids: Sequence[int]) -> list[list[int]]:
    """The greedy continuations of the questions' prompts, left-padded into one batch."""
    param = next(model.parameters())
    width = max(len(q.input_ids) for q in questions)
    pad = _pad_id(model)
    ids = torch.tensor([[pad] * (width - len(q.input_ids)) + q.input_ids for q in questions], device=param.device)
    mask = torch.tensor([[False] * (width - len(q.input_ids)) + [True] * len(q.input_ids) for q in questions],
                        device=param.device)
    items = {m: batch.with_items(batch.items.to(param.device, param.dtype))
             for m, batch in _batched(questions).items()}
    return greedy_decode(model, ids, items, max_new_tokens, eos_ids, prompt_mask=mask).tolist()


def _until_end(row: list[int], eos_ids: Sequence[int]) -> list[int]:
    """The ids up to and including the first end-of-sequence id."""
    end = next((k for k, token in enumerate(row) if token in eos_ids), None)
    return row if end is None else row[:end + 1]


def _pad_id(model: MimoModel) -> int:
    """An id that is no modality's special token (left padding: never attended, any such id does)."""
    special = set(model.special_token_ids.values())
    return next(i for i in range(len(special) + 1) if i not in special)


@torch.no_grad()
def held_out_loss(model: MimoModel, dataset, batch_size: int = 16,
                  positions: MRopePositions | None = None) -> tuple[float, int]:
    """(the mean cross-entropy per label token over every good sample, the number of good samples): padded
    batches through the model's single-process forward, the loss the training step computes (`positions`: the
    provider's `text_positions` where the model does not number tokens 0, 1, ...: Qwen-VL's M-RoPE). Bad samples
    (`BadSample`) are left out, not substituted."""
    model.eval()
    samples = []
    for index in range(len(dataset)):
        try:
            samples.append(dataset[index])
        except BadSample:
            continue
    if not samples:
        raise ValueError("held_out_loss found no good sample to evaluate")
    loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(samples), batch_size):
        batch = MimoBatch.collate(samples[start:start + batch_size], dataset.pad_id)
        layout = {} if positions is None else {"position_ids": positions.rows(batch.input_ids, batch)}
        summed, count = model(batch.input_ids, batch.labels, batch.modality_inputs, **layout)
        loss_sum, tokens = loss_sum + summed.double(), tokens + int(count)
    return float(loss_sum) / max(tokens, 1), len(samples)


def _batched(questions: Sequence[Question]) -> dict[str, ModalityBatch]:
    """The items of several questions as one `ModalityBatch` per modality, packed ones with their grids (a question
    without a modality counts 0)."""
    out = {}
    for m in sorted({m for q in questions for m in q.items}):
        present = [q for q in questions if m in q.items]
        packed = m in present[0].item_grids
        counts = [0 if m not in q.items else int((q.item_grids[m] if packed else q.items[m]).shape[0])
                  for q in questions]
        grids = torch.cat([q.item_grids[m] for q in present]) if packed else None
        out[m] = ModalityBatch(torch.cat([q.items[m] for q in present]), torch.tensor(counts, dtype=torch.long), grids)
    return out
