"""Held-out evaluation on one process with a whole (unwrapped) MimoModel: answer accuracy by greedy generation
(`mimo.models.generation`), and the mean per-token loss (any dataset: LLaVA-format held-out files)."""

from __future__ import annotations

import torch

from mimo.data import BadSample, MimoBatch
from mimo.data.positions import MRopePositions
from mimo.models import MimoModel, ModalityBatch
from mimo.models.generation import greedy_decode
from mimo.models.labels import IGNORE_INDEX

Item = dict[str, torch.Tensor]  # a sample's items, by modality: [count, ...]


def answer_accuracy(model: MimoModel, dataset, batch_size: int = 128) -> float:
    """Fraction of samples whose first answer greedy generation reproduces exactly: the first run of labelled
    positions (for the digits: the word and EOS), generated from the prompt before it and the sample's items (of
    every modality). Bad samples (`BadSample`) are left out of the count."""
    model.eval()
    groups: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, Item]]] = {}
    for index in range(len(dataset)):
        try:
            sample = dataset[index]
        except BadSample:
            continue
        prompt, answer = _first_answer(sample.input_ids, sample.labels)
        groups.setdefault((len(prompt), len(answer)), []).append((prompt, answer, sample.items))
    hits = total = 0
    for (_, answer_length), group in groups.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            generated = greedy_decode(model, torch.stack([c[0] for c in chunk]), _batched([c[2] for c in chunk]),
                                      answer_length)
            hits += int((generated == torch.stack([c[1] for c in chunk])).all(dim=1).sum())
            total += len(chunk)
    if total == 0:
        raise ValueError("answer_accuracy found no good sample to evaluate")
    return hits / total


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


def _batched(items: list[Item]) -> dict[str, ModalityBatch]:
    """The items of several samples as one `ModalityBatch` per modality (a sample without a modality counts 0)."""
    modalities = sorted({m for sample in items for m in sample})
    out = {}
    for m in modalities:
        present = [sample[m] for sample in items if m in sample]
        counts = [int(sample[m].shape[0]) if m in sample else 0 for sample in items]
        out[m] = ModalityBatch(torch.cat(present), torch.tensor(counts, dtype=torch.long))
    return out


def _first_answer(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ids up to the first labelled position, the labels of the run of labelled positions from there)."""
    labelled = (labels != IGNORE_INDEX).tolist()
    first = labelled.index(True)
    end = labelled.index(False, first) if False in labelled[first:] else len(labelled)
    return input_ids[:first + 1], labels[first:end]
