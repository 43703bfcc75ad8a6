"""The built-in captioning dataset: scikit-learn's 1797 handwritten 8×8 digits, answered in words.

A sample is `[bos] <image ×16> which digit ? <answer> [eos]`, e.g. answer "seven"; labels sit only on the
answer and eos, so greedy generation after "?" is the accuracy measure. The scans ship inside the
scikit-learn package (`load_digits`, no download), which makes this a real dataset any CPU test can use.
Train and held-out splits come from one seeded permutation, so they never overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from mimo.data.batch import MimoBatch, Sample
from mimo.models.labels import IGNORE_INDEX

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_DIGITS = 1797
SPLITS = ("train", "held_out")


class DigitsTokenizer:
    """Word-level ids 0..15: <pad> <bos> <eos>, the prompt words, the ten digit words (far below 256)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    PROMPT = ("which", "digit", "?")
    UNKNOWN = "<unk>"

    def __init__(self) -> None:
        """The fixed vocabulary and its reverse map."""
        self.vocab = (*self.SPECIALS, *self.PROMPT, *WORDS)
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = (self.ids[w] for w in self.SPECIALS)

    @property
    def vocab_size(self) -> int:
        """Number of word ids."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the whitespace-separated words of `text`; an unknown word is an error."""
        unknown = [w for w in text.split() if w not in self.ids]
        if unknown:
            raise ValueError(f"words {unknown} are not in the digits vocabulary {list(self.vocab)}")
        return [self.ids[w] for w in text.split()]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Words of `ids` joined by spaces; ids outside the vocabulary (a model's guess) read as <unk>."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        skip = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        return " ".join(self._word(i) for i in ids if i not in skip)

    def _word(self, token_id: int) -> str:
        """The word of one id, or <unk>."""
        return self.vocab[token_id] if 0 <= token_id < len(self.vocab) else self.UNKNOWN


@functools.lru_cache(maxsize=1)
def load_digit_scans() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scans as float64 [1797, 8, 8] (grey levels 0..16) and their digits [1797], from scikit-learn."""
    from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn

    data = load_digits()
    return torch.from_numpy(data.images.copy()), torch.from_numpy(data.target.copy()).long()


def digits_split(split: str, held_out_size: int = 297, split_seed: int = 0) -> torch.Tensor:
    """Scan indices of a split: a seeded permutation's first `held_out_size` are held out, the rest train."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; splits are {list(SPLITS)}")
    if not 0 < held_out_size < NUM_DIGITS:
        raise ValueError(f"held_out_size must be in (0, {NUM_DIGITS}), got {held_out_size}")
    order = torch.randperm(NUM_DIGITS, generator=torch.Generator().manual_seed(split_seed))
    return order[:held_out_size] if split == "held_out" else order[held_out_size:]


class DigitsDataset:
    """One split of the digits as captioning samples for the image modality `modality` (the tiny LLaVA's ids by
    default)."""

    def __init__(
        self,
        modality: str,
        split: str = "train",
        image_token_id: int = 256,
        tokens_per_image: int = 16,
        held_out_size: int = 297,
        split_seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load the scans (cached) and pick the split's indices."""
        self.tokenizer = DigitsTokenizer()
        if 0 <= image_token_id < self.tokenizer.vocab_size:
            raise ValueError(f"image_token_id {image_token_id} is a word id of the digits vocabulary "
                             f"[0, {self.tokenizer.vocab_size}); use an id outside it (the tiny LLaVA uses 256)")
        self.modality, self.split = modality, split
        self.indices = digits_split(split, held_out_size, split_seed)
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.dtype = dtype
        self.pad_id = self.tokenizer.pad_id
        self._scans, self._digits = load_digit_scans()

    def __len__(self) -> int:
        """Number of samples in the split."""
        return self.indices.shape[0]

    def __getitem__(self, index: int) -> Sample:
        """`[bos] <image ×T> which digit ? <answer> [eos]`, labels on the answer and eos only."""
        answer = self.tokenizer.ids[self.answer_word(index)]
        input_ids = torch.cat([self.prompt_for_generation(index), torch.tensor([answer, self.tokenizer.eos_id])])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-3:-1] = input_ids[-2:]  # "?" predicts the answer, the answer predicts eos
        return Sample(input_ids, labels, {self.modality: self.image(index).unsqueeze(0)})

    def image(self, index: int) -> torch.Tensor:
        """The scan as [3, 8, 8]: grey levels 0..16 scaled to [-1, 1], replicated to three channels."""
        scan = self._scans[self._scan_index(index)] / 8.0 - 1.0
        return scan.unsqueeze(0).repeat(3, 1, 1).to(self.dtype)

    def digit(self, index: int) -> int:
        """The digit (0..9) sample `index` shows."""
        return int(self._digits[self._scan_index(index)])

    def answer_word(self, index: int) -> str:
        """The caption answer: the digit's English word."""
        return WORDS[self.digit(index)]

    def prompt_for_generation(self, index: int) -> torch.Tensor:
        """Ids up to and including "?": what greedy generation of the answer starts from."""
        self._scan_index(index)
        image = [self.image_token_id] * self.tokens_per_image
        words = self.tokenizer.encode(" ".join(DigitsTokenizer.PROMPT))
        return torch.tensor([self.tokenizer.bos_id, *image, *words], dtype=torch.long)

    def caption_accuracy(self, predicted_words: Sequence[str], indices: Sequence[int]) -> float:
        """Fraction of predictions equal (after stripping spaces) to the answer word of those samples."""
        if len(predicted_words) != len(indices):
            raise ValueError(f"{len(predicted_words)} predictions for {len(indices)} indices; give one per index")
        if not indices:
            raise ValueError("caption_accuracy needs at least one prediction")
        hits = sum(w.strip() == self.answer_word(i) for w, i in zip(predicted_words, indices, strict=True))
        return hits / len(indices)

    def batch(self, indices: Sequence[int], seq_len: int | None = None) -> MimoBatch:
        """The collated batch of these samples (text padded with <pad>)."""
        return MimoBatch.collate([self[i] for i in indices], self.pad_id, seq_len)

    def _scan_index(self, index: int) -> int:
        """The scikit-learn index of sample `index`, or a clear error."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside the {self.split} split's [0, {len(self)})")
        return int(self.indices[index])
