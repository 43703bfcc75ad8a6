"""The multimodal model: modality submodules (encoder + projection) feeding one language model.

`MimoModel` knows how to encode each modality, where its embeddings go in the text sequence (at that
modality's special-token positions, in sample order) and how to score the language model's output. Its
`forward` is the single-process reference every parity test compares a distributed run against; the
distributed training step calls the modality submodules itself (per micro-batch and replica) and then the
same pieces (`language_inputs`, `language_labels`, the language model's single-call `forward`) on the
ranks that hold them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from mimo.models.decoder import Decoder
from mimo.models.labels import IGNORE_INDEX, is_special, loss_token_mask
from mimo.models.sequence_parallel import takes_sequence_parallel
from mimo.models.transfer import to_device


@dataclass
class ModalityBatch:
    """One modality's inputs for a batch, in sample order, and how many items each sample has.

    Items of one size are stacked: `items` [N, ...]. Items of different sizes (native-resolution images) are
    packed: `items` [rows, D] holds every item's rows one after another and `item_grids` [N, k] (on the CPU) each
    item's grid of rows (Qwen-VL: temporal, height, width patches), so item i has `item_grids[i].prod()` rows."""

    items: torch.Tensor
    items_per_sample: torch.Tensor
    item_grids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        """Check that the items are exactly the ones the per-sample counts (and grids) announce."""
        if self.items_per_sample.dim() != 1:
            raise ValueError(f"items_per_sample must be 1-D [B], got shape {tuple(self.items_per_sample.shape)}")
        total = int(self.items_per_sample.sum())
        if self.item_grids is None:
            if self.items.shape[0] != total:
                raise ValueError(f"items holds {self.items.shape[0]} items but items_per_sample sums to {total}")
            return
        if self.item_grids.dim() != 2 or self.item_grids.shape[0] != total:
            raise ValueError(f"item_grids must be [{total}, k] (one grid per item), got "
                             f"{tuple(self.item_grids.shape)}")
        rows = int(self.item_rows().sum())
        if self.items.shape[0] != rows:
            raise ValueError(f"packed items hold {self.items.shape[0]} rows but item_grids announce {rows}")

    @property
    def packed(self) -> bool:
        """Whether items are packed rows of different sizes (`item_grids` given)."""
        return self.item_grids is not None

    def item_rows(self) -> torch.Tensor:
        """Rows of `items` per item [N]: 1 each when stacked, the grid's product when packed."""
        if self.item_grids is None:
            return torch.ones(int(self.items_per_sample.sum()), dtype=torch.long)
        return self.item_grids.prod(dim=1)

    def select(self, start: int, end: int) -> ModalityBatch:
        """The items of samples [start, end), located by the cumulative item counts (and their rows)."""
        counts = self.items_per_sample
        first = int(counts[:start].sum())
        last = first + int(counts[start:end].sum())
        if self.item_grids is None:
            return ModalityBatch(self.items[first:last], counts[start:end])
        rows = self.item_rows()
        row_first = int(rows[:first].sum())
        row_last = row_first + int(rows[first:last].sum())
        return ModalityBatch(self.items[row_first:row_last], counts[start:end], self.item_grids[first:last])

    def with_items(self, items: torch.Tensor) -> ModalityBatch:
        """The same counts and grids around other items (the same items moved or pinned)."""
        return ModalityBatch(items, self.items_per_sample, self.item_grids)

    @classmethod
    def concat(cls, batches: list[ModalityBatch]) -> ModalityBatch:
        """Batches joined along samples; all packed or all stacked."""
        grids = [b.item_grids for b in batches]
        if any(g is None for g in grids) and not all(g is None for g in grids):
            raise ValueError("cannot join packed and stacked items of one modality")
        return cls(torch.cat([b.items for b in batches]), torch.cat([b.items_per_sample for b in batches]),
                   None if grids[0] is None else torch.cat(grids))


class ModalitySubmodule(nn.Module):
    """One modality's encoder and projection: items → [N, tokens_per_item, language hidden size].

    A pipeline stage of it (the encoder built for a `layer_range`) holds the projection only on the last stage;
    a stage before the last has none and returns its blocks' hidden states for the next stage."""

    def __init__(self, encoder: nn.Module, projection: nn.Module | None) -> None:
        """Hold the encoder (must expose `tokens_per_item`) and the projection to the language width (None on a
        pipeline stage before the last)."""
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    @property
    def tokens_per_item(self) -> int:
        """Embeddings produced per item (an encoder of items of one size)."""
        return self.encoder.tokens_per_item

    def item_tokens(self, batch: ModalityBatch) -> torch.Tensor:
        """Embeddings each item of `batch` produces [N]: `tokens_per_item` each, or the packed encoder's
        `tokens_of(item_grids)` (on the CPU)."""
        if batch.item_grids is None:
            return torch.full((int(batch.items_per_sample.sum()),), self.tokens_per_item, dtype=torch.long)
        return self.encoder.tokens_of(batch.item_grids)

    def tokens_per_sample(self, batch: ModalityBatch) -> torch.Tensor:
        """Embeddings each sample of `batch` receives [B] (on the CPU: host metadata)."""
        if batch.item_grids is None:
            return batch.items_per_sample * self.tokens_per_item
        owner = torch.repeat_interleave(torch.arange(batch.items_per_sample.shape[0]), batch.items_per_sample)
        return torch.zeros_like(batch.items_per_sample).index_add_(0, owner, self.item_tokens(batch))

    def forward(self, items: torch.Tensor, item_grids: torch.Tensor | None = None, empty: bool = False
                ) -> torch.Tensor:
        """Encode then project items into embeddings [tokens, H] in item order: stacked items [N, ...], or packed
        rows with their `item_grids` (the encoder takes both). With none (a text-only micro-batch), one zero item
        (the encoder's `smallest_grid` when packed) is encoded and none of its rows kept: [0, H] with a graph to
        every parameter (exactly zero gradients), and no kernel sees an empty batch (CUDA's
        scaled_dot_product_attention returns None for one).
        A pipeline stage past the first takes the stage before's output as `items` (`stage_input_shape`; stacked:
        `empty` says it is the stand-in zero item's, so no rows are kept; packed: the grids say so); one before the
        last returns its own."""
        if item_grids is None:
            stand_in = _takes_items(self.encoder) and items.shape[0] == 0
            hidden = self.encoder(items.new_zeros((1, *items.shape[1:])) if stand_in else items)
            if self.projection is None:
                return hidden
            out = self.projection(hidden).flatten(0, 1)
            return out[:0] if stand_in or empty else out
        stand_in = item_grids.shape[0] == 0
        grids = self.encoder.smallest_grid.reshape(1, -1) if stand_in else item_grids
        if stand_in and _takes_items(self.encoder):
            items = items.new_zeros((int(grids.prod()), *items.shape[1:]))
        out = self.encoder(items, grids)
        if self.projection is None:
            return out
        out = self.projection(out)
        return out[:0] if stand_in else out

    def stage_input_shape(self, batch: ModalityBatch) -> tuple[int, ...]:
        """What a pipeline stage past the first receives for `batch`'s items from the stage before: stacked items'
        hidden states [max(N, 1), stack_tokens, hidden] (the stand-in item for none), or a packed tower's flat
        message (`stage_input_numel` of the grids, of the smallest item's for none)."""
        grids = batch.item_grids
        if grids is None:
            return max(int(batch.items.shape[0]), 1), self.encoder.stack_tokens, self.encoder.hidden_size
        if not hasattr(self.encoder, "stage_input_numel"):
            raise ValueError(f"{type(self.encoder).__name__} takes items of one size (stacked), but these items are "
                             f"packed (item_grids): a pipelined encoder of packed items is a packed tower (Qwen-VL's)")
        grids = grids if grids.shape[0] else self.encoder.smallest_grid.reshape(1, -1)
        return (self.encoder.stage_input_numel(grids),)

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
        """The encoder's and the projection's plans, under their attribute names; `sequence_parallel` is the
        encoder's (the projection maps whole tokens, after the encoder has gathered its sequence back)."""
        if sequence_parallel and not takes_sequence_parallel(self.encoder):
            raise ValueError(f"its encoder's {type(self.encoder).__name__}.tp_plan takes no sequence_parallel "
                             f"argument, so it cannot run sequence-parallel; set sequence_parallel false")
        encoder_plan = self.encoder.tp_plan(sequence_parallel=True) if sequence_parallel else self.encoder.tp_plan()
        plan = {f"encoder.{k}": v for k, v in encoder_plan.items()}
        if self.projection is not None:
            plan.update({f"projection.{k}": v for k, v in self.projection.tp_plan().items()})
        return plan


class MimoModel(nn.Module):
    """Modality submodules and a language model (either may be absent on a rank that does not hold it)."""

    def __init__(
        self,
        language_model: Decoder | None,
        modality_submodules: Mapping[str, ModalitySubmodule] | None,
        special_token_ids: Mapping[str, int],
    ) -> None:
        """Hold the parts; every modality needs its own special token id."""
        super().__init__()
        self.language_model = language_model
        self.modality_submodules = nn.ModuleDict(dict(modality_submodules or {}))
        self.special_token_ids = dict(special_token_ids)
        missing = sorted(set(self.modality_submodules) - set(self.special_token_ids))
        if missing:
            raise ValueError(f"modalities {missing} have no entry in special_token_ids")
        if len(set(self.special_token_ids.values())) != len(self.special_token_ids):
            raise ValueError(f"special token ids must be distinct, got {self.special_token_ids}")

    def encode(self, modality_inputs: Mapping[str, ModalityBatch]) -> dict[str, torch.Tensor]:
        """Each modality's projected embeddings, flattened to [total_tokens, H] in sample order."""
        out = {}
        for name, batch in modality_inputs.items():
            if name not in self.modality_submodules:
                raise ValueError(f"no submodule for modality {name!r}; have {sorted(self.modality_submodules)}")
            out[name] = self.modality_submodules[name](batch.items, batch.item_grids)
        return out

    def tokens_per_sample(self, modality_inputs: Mapping[str, ModalityBatch]) -> dict[str, torch.Tensor]:
        """Per modality, how many embeddings each sample receives (`ModalitySubmodule.tokens_per_sample`)."""
        return {name: _inner(self.modality_submodules[name]).tokens_per_sample(batch)
                for name, batch in modality_inputs.items()}

    def language_inputs(
        self,
        input_ids: torch.Tensor,
        modality_embeddings: Mapping[str, torch.Tensor],
        tokens_per_sample: Mapping[str, torch.Tensor],
        check: bool = True,
        host_ids: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The first stage's keyword inputs: text ids (special ids zeroed, so an id past the vocabulary is
        fine) and, per modality, (where, embeddings) to write over its special-token positions in order.

        With `check`, first `check_alignment` (a caller that has the ids on the CPU checks there instead, and
        passes check=False: the check reads counts back, a host sync on an accelerator). Given `host_ids`
        (the same ids on the CPU), "where" is flat positions found there and copied without a host sync;
        else a mask, whose `masked_scatter` syncs the host in its backward on an accelerator.
        """
        if check:
            self.check_alignment(input_ids, tokens_per_sample, {n: v.shape[0] for n, v in modality_embeddings.items()})
        embeddings_at = [(self.special_positions(name, input_ids, host_ids), values)
                         for name, values in modality_embeddings.items()]
        return {"input_ids": input_ids.masked_fill(is_special(input_ids, self.special_token_ids), 0),
                "embeddings_at": embeddings_at}

    def special_positions(self, name: str, input_ids: torch.Tensor, host_ids: torch.Tensor | None) -> torch.Tensor:
        """Modality `name`'s special-token positions: a [B, S] mask, or flat indices from the CPU ids (also where a
        later pipeline stage adds DeepStack's features)."""
        token_id = self.special_token_ids[name]
        if host_ids is None:
            return input_ids == token_id
        positions = (host_ids == token_id).flatten().nonzero().squeeze(1)
        return to_device(positions, input_ids.device)

    def check_alignment(self, input_ids: torch.Tensor, tokens_per_sample: Mapping[str, torch.Tensor],
                        rows: Mapping[str, int]) -> None:
        """Raise if a sample's special-token count differs from its modality-token count, or a modality's
        embedding rows differ from its per-sample counts' sum."""
        for name, token_id in self.special_token_ids.items():
            found = (input_ids == token_id).sum(dim=1)
            expected = tokens_per_sample.get(name, torch.zeros_like(found))
            _check_counts(name, token_id, found, expected, rows.get(name, 0))

    def language_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels with modality positions (special-token inputs or targets) set to ignore: they never count."""
        return labels.masked_fill(~loss_token_mask(input_ids, labels, self.special_token_ids), IGNORE_INDEX)

    def align_embeddings(
        self,
        input_ids: torch.Tensor,
        modality_embeddings: Mapping[str, torch.Tensor],
        tokens_per_sample: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """Text embeddings [B, S, H] with each modality's embeddings written, in order, at its special tokens."""
        return self._language_model().embed(**self.language_inputs(input_ids, modality_embeddings, tokens_per_sample))

    def language_loss(
        self, embeddings: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, label count) over text positions; modality positions never carry a label."""
        return self._language_model()(embeddings, labels=self.language_labels(input_ids, labels))

    def language_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] of aligned embeddings, for evaluation."""
        decoder = self._language_model()
        return decoder.logits(decoder(embeddings))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        modality_inputs: Mapping[str, ModalityBatch] | None = None,
        **layout: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, align and score in one process, with one language-model call: the parity reference. `layout`:
        the decoder's position_ids / document_ids where the text is not rows numbered 0, 1, ... (M-RoPE, packing)."""
        modality_inputs = modality_inputs or {}
        inputs = self.language_inputs(input_ids, self.encode(modality_inputs), self.tokens_per_sample(modality_inputs))
        return self._language_model()(**inputs, labels=self.language_labels(input_ids, labels), **layout)

    def _language_model(self) -> Decoder:
        """The language model, or a clear error on a rank that does not hold one."""
        if self.language_model is None:
            raise RuntimeError("this MimoModel holds no language model (an encoder-only rank)")
        return self.language_model


def _check_counts(name: str, token_id: int, found: torch.Tensor, expected: torch.Tensor, rows: int) -> None:
    """Raise if any sample's special-token count differs from its modality-token count."""
    if found.shape != expected.shape:
        raise ValueError(f"modality {name!r}: tokens_per_sample has shape {tuple(expected.shape)}, "
                         f"input_ids has {found.shape[0]} samples")
    expected = expected.to(found.device)
    mismatch = (found != expected).nonzero()
    if mismatch.numel():
        b = int(mismatch[0, 0])
        raise ValueError(f"sample {b}: {int(found[b])} special tokens for modality {name!r} (id {token_id}) "
                         f"in input_ids, but {int(expected[b])} {name!r} embeddings for it")
    if rows != int(expected.sum()):
        raise ValueError(f"modality {name!r}: {rows} embeddings given, but tokens_per_sample sums to "
                         f"{int(expected.sum())}")


def _takes_items(encoder: nn.Module) -> bool:
    """Whether the encoder (or its pipeline stage) takes the items themselves: it holds the front (embeddings, a
    stem); an encoder built whole always does."""
    return getattr(encoder, "has_front", True)


def _inner(module: nn.Module) -> nn.Module:
    """The module itself, or the one a data-parallel wrapper holds in `.module` (wrapping is applied from
    outside, so the model only looks through it)."""
    return getattr(module, "module", module)
