"""A generated multimodal dataset: any number of items per sample, uneven text, and something to learn.

Sample i depends only on (seed, i). Its text is `[bos] filler { <special ×T> query answer filler } [eos]`:
one block per item, modalities interleaved, each modality's items in the order they appear. Two rules make
the loss fall: an item is a constant level plus noise, and the answer token after it names that level's
bucket (the model has to look at the item); filler is an arithmetic sequence over the filler tokens that
runs on through the sample (predictable from the two tokens before). Labels are next-token targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mimo.data.batch import MimoBatch, Sample
from mimo.data.labels import next_token_labels

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_FILLER_STEPS = (1, 2, 3)
_SEED_MULTIPLIER = 0x9E3779B97F4A7C15  # spreads (seed, index) over the generator's seed space


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of the dataset: its special token id, tokens per item and the shape of an item; or, for items
    of different sizes (packed, see `ModalityBatch`), the grids an item is drawn from, each item then rows
    [prod(grid), *item_shape] that give prod(grid) // `merge` tokens."""

    token_id: int
    tokens_per_item: int
    item_shape: tuple[int, ...]
    grids: tuple[tuple[int, ...], ...] = ()
    merge: int = 1

    @classmethod
    def packed(cls, token_id: int, row_width: int, grids: Sequence[tuple[int, ...]], merge: int) -> ModalitySpec:
        """Packed items of rows [row_width] (Qwen-VL's patches), each of one of `grids` (e.g. (1, h, w) patches)."""
        if not grids or any(int(torch.tensor(g).prod()) % merge for g in grids):
            raise ValueError(f"grids {list(grids)} must be given and hold whole merges of {merge} rows")
        return cls(token_id, 0, (row_width,), tuple(tuple(g) for g in grids), merge)

    def tokens_of(self, grid: Sequence[int]) -> int:
        """Tokens of an item of this grid (packed) or `tokens_per_item`."""
        return int(torch.tensor(grid).prod()) // self.merge if self.grids else self.tokens_per_item

    @classmethod
    def image(cls, token_id: int, tokens_per_item: int, size: int = 8, channels: int = 3) -> ModalitySpec:
        """Images [channels, size, size] (the tiny ViT: 3×8×8, 16 tokens)."""
        return cls(token_id, tokens_per_item, (channels, size, size))

    @classmethod
    def audio(cls, token_id: int, tokens_per_item: int, n_mels: int = 16, frames: int = 16) -> ModalitySpec:
        """Log-mel clips [n_mels, frames] (the tiny audio encoder: 16×16, 8 tokens)."""
        return cls(token_id, tokens_per_item, (n_mels, frames))


class SyntheticDataset:
    """`num_samples` generated samples over text ids [0, vocab_size) and the given modalities.

    Text ids are [0, vocab_size) without the modalities' special ids (a Hugging Face model's `<image>` may sit
    anywhere in its vocabulary), in order: pad, bos, eos, one query token per modality, `num_buckets` answer
    tokens, then the filler tokens. With every special id past the vocabulary (mimo's default), text id k is k."""

    def __init__(
        self,
        num_samples: int,
        modalities: Mapping[str, ModalitySpec],
        vocab_size: int = 256,
        items_per_sample: Sequence[int] = (0, 1, 3),
        text_length: tuple[int, int] = (2, 12),
        num_buckets: int = 4,
        noise: float = 0.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Keep the settings and check that they can generate valid samples."""
        self.num_samples = num_samples
        self.modalities = dict(modalities)
        self.vocab_size = vocab_size
        self.items_per_sample = tuple(items_per_sample)
        self.text_length = text_length
        self.num_buckets = num_buckets
        self.noise = noise
        self.seed = seed
        self.dtype = dtype
        self.specials_inside = sorted({s.token_id for s in self.modalities.values() if 0 <= s.token_id < vocab_size})
        self.pad_id, self.bos_id, self.eos_id = (self._text_id(k) for k in (PAD_ID, BOS_ID, EOS_ID))
        self.query_ids = {name: self._text_id(3 + m) for m, name in enumerate(self.modalities)}
        self.answer_base = 3 + len(self.modalities)
        self.filler_base = self.answer_base + num_buckets
        self._check()

    def _text_id(self, k: int) -> int:
        """The k-th id of [0, vocab_size) that is no modality's special id."""
        for special in self.specials_inside:
            if k >= special:
                k += 1
        return k

    def _check(self) -> None:
        """Reject settings that would produce clashing ids, no filler, or impossible counts."""
        if self.num_samples < 1 or self.num_buckets < 1:
            raise ValueError(f"num_samples and num_buckets must be positive, got {self.num_samples}, "
                             f"{self.num_buckets}")
        if not self.items_per_sample or min(self.items_per_sample) < 0:
            raise ValueError(f"items_per_sample must be non-empty choices >= 0, got {self.items_per_sample}")
        lo, hi = self.text_length
        if not 0 <= lo <= hi:
            raise ValueError(f"text_length must be (min, max) with 0 <= min <= max, got {self.text_length}")
        reserved = self.filler_base + len(self.specials_inside)
        if self.vocab_size - reserved < 2:
            raise ValueError(f"vocab_size {self.vocab_size} leaves fewer than 2 filler ids after {reserved} reserved "
                             f"ones (special ids inside it included); use vocab_size >= {reserved + 2}")
        ids = [spec.token_id for spec in self.modalities.values()]
        if min(ids, default=0) < 0 or len(set(ids)) != len(ids):
            raise ValueError(f"special token ids {ids} must be distinct and non-negative")

    def __len__(self) -> int:
        """Number of samples."""
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        """Sample `index`, generated from (seed, index) alone."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside [0, {self.num_samples})")
        gen = torch.Generator().manual_seed((self.seed * _SEED_MULTIPLIER + index) % 2**63)
        counts = {name: self.items_per_sample[_randint(gen, len(self.items_per_sample))] for name in self.modalities}
        buckets = {name: torch.randint(self.num_buckets, (k,), generator=gen) for name, k in counts.items()}
        grids = {name: self._grids(spec, counts[name], gen) for name, spec in self.modalities.items() if spec.grids}
        items = {name: self._items(spec, buckets[name], gen, grids.get(name)) for name, spec in self.modalities.items()}
        input_ids = torch.tensor(self._text(self._block_order(counts, gen), buckets, gen, grids), dtype=torch.long)
        return Sample(input_ids, next_token_labels(input_ids), items, grids)

    def bucket_levels(self) -> torch.Tensor:
        """The constant each bucket's items scatter around: evenly spaced over [-1, 1]."""
        if self.num_buckets == 1:
            return torch.zeros(1, dtype=torch.float64)
        return torch.linspace(-1.0, 1.0, self.num_buckets, dtype=torch.float64)

    def batch(self, indices: Sequence[int], seq_len: int | None = None) -> MimoBatch:
        """The collated batch of these samples (text padded with `pad_id`)."""
        return MimoBatch.collate([self[i] for i in indices], self.pad_id, seq_len)

    def _items(self, spec: ModalitySpec, buckets: torch.Tensor, gen: torch.Generator,
               grids: torch.Tensor | None = None) -> torch.Tensor:
        """Items [k, *item_shape] (packed: their rows, [sum of rows, *item_shape]): their bucket's level plus
        Gaussian noise."""
        rows = buckets if grids is None else buckets.repeat_interleave(grids.prod(dim=1))
        noise = torch.randn((rows.shape[0], *spec.item_shape), generator=gen, dtype=torch.float64)
        levels = self.bucket_levels()[rows].view(-1, *([1] * len(spec.item_shape)))
        return (levels + self.noise * noise).to(self.dtype)

    def _grids(self, spec: ModalitySpec, k: int, gen: torch.Generator) -> torch.Tensor:
        """The grids of k packed items [k, g], each drawn from the spec's."""
        return torch.tensor([spec.grids[_randint(gen, len(spec.grids))] for _ in range(k)],
                            dtype=torch.long).reshape(k, len(spec.grids[0]))

    def _block_order(self, counts: Mapping[str, int], gen: torch.Generator) -> list[tuple[str, int]]:
        """(modality, k) per item block, modalities interleaved at random, each modality's k in order."""
        names = [name for name, k in counts.items() for _ in range(k)]
        names = [names[j] for j in torch.randperm(len(names), generator=gen).tolist()]
        seen: dict[str, int] = {}
        order = []
        for name in names:
            order.append((name, seen.get(name, 0)))
            seen[name] = seen.get(name, 0) + 1
        return order

    def _text(
        self, order: list[tuple[str, int]], buckets: Mapping[str, torch.Tensor], gen: torch.Generator,
        grids: Mapping[str, torch.Tensor],
    ) -> list[int]:
        """bos, filler, then per item block: specials, query, answer, filler; then eos."""
        filler = self._filler(gen)
        ids = [self.bos_id, *filler(self._length(gen))]
        for name, k in order:
            spec = self.modalities[name]
            ids += [spec.token_id] * spec.tokens_of(grids[name][k].tolist() if name in grids else ())
            ids += [self.query_ids[name], self._text_id(self.answer_base + int(buckets[name][k]))]
            ids += filler(self._length(gen))
        return [*ids, self.eos_id]

    def _filler(self, gen: torch.Generator) -> Callable[[int], list[int]]:
        """A function giving the next n tokens of this sample's arithmetic filler sequence."""
        count = self.vocab_size - self.filler_base - len(self.specials_inside)
        position = _randint(gen, count)
        step = _FILLER_STEPS[_randint(gen, len(_FILLER_STEPS))]

        def take(n: int) -> list[int]:
            """The next n filler tokens; the sequence continues on the next call."""
            nonlocal position
            out = [self._text_id(self.filler_base + (position + j * step) % count) for j in range(n)]
            position += n * step
            return out

        return take

    def _length(self, gen: torch.Generator) -> int:
        """A filler length drawn uniformly from text_length (inclusive)."""
        lo, hi = self.text_length
        return lo + _randint(gen, hi - lo + 1)


def _randint(gen: torch.Generator, n: int) -> int:
    """A uniform integer in [0, n) from `gen`."""
    return int(torch.randint(n, (1,), generator=gen))
