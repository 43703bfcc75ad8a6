"""LLaVA-format training data: a JSON / JSONL file of conversations and a folder of images (`data.name: llava`).

`LlavaDataset[i]` parses entry i (`mimo.data.conversation`), renders it with the template
(`mimo.data.templates`), prepares its images as the model takes them (`mimo.data.image_inputs`: LLaVA's one size
through its Hugging Face image processor, or Qwen-VL's native-resolution patches), tokenizes the whole text once
with character offsets, labels the tokens inside the assistant spans, and expands each image token to that
image's count of model image tokens. Labels are next-token targets (`labels[t]` is the target of position t), as
every mimo dataset's.

Truncation: a sample longer than `max_seq_len` is dropped, never cut (a cut could split an image's token block
or leave nothing to learn); it is a bad sample like a missing or corrupt image or a malformed conversation
(`BadSample`), which `batch` skips or stops on as `on_bad_sample` says, recording each skip in the batch.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mimo.data.bad_samples import BadSample, SkippedSample
from mimo.data.batch import MimoBatch, Sample
from mimo.data.conversation import IMAGE, Conversation, ConversationError, parse_entry
from mimo.data.image_inputs import FixedSizeImages, ImageInputError, PackedImages, PreparedImage
from mimo.data.questions import Question
from mimo.data.scan import DataFileError, leaves_folder
from mimo.data.templates import Rendered, build_template
from mimo.hf.prompt import Prompter, PromptError
from mimo.models.labels import IGNORE_INDEX

ON_BAD_SAMPLE = ("skip", "error")


class Entries:
    """A data file's entries as JSON texts in one bytes buffer with offsets: parsed one at a time when asked,
    cheap to hand to loader worker processes (two objects, not one Python object per entry)."""

    def __init__(self, path: str | Path) -> None:
        """Read a JSON array (`.json`) or one entry per line (`.jsonl`; a line that does not parse is a bad
        sample, found when it is read)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise DataFileError(f"data file {self.path} does not exist")
        if self.path.suffix == ".jsonl":
            texts, self.lines = self._jsonl()
        else:
            texts, self.lines = self._json(), None
        self._buffer = b"".join(texts)
        self._offsets = array("q", [0])
        for text in texts:
            self._offsets.append(self._offsets[-1] + len(text))

    def _jsonl(self) -> tuple[list[bytes], array]:
        """The non-empty lines and their 1-based line numbers."""
        texts, lines = [], array("q")
        with self.path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    texts.append(line.strip())
                    lines.append(number)
        return texts, lines

    def _json(self) -> list[bytes]:
        """Each element of the file's top-level array, re-serialized."""
        try:
            data = json.loads(self.path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataFileError(f"data file {self.path} is not valid JSON ({e}); a .jsonl file holds one entry a "
                                f"line") from None
        if not isinstance(data, list):
            raise DataFileError(f"data file {self.path} must hold a JSON array of entries, got a "
                                f"{type(data).__name__}")
        return [json.dumps(entry, ensure_ascii=False).encode() for entry in data]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def where(self, index: int) -> str:
        """Where entry `index` sits: `file:line` for JSONL, `file[index]` for a JSON array."""
        return f"{self.path}:{self.lines[index]}" if self.lines is not None else f"{self.path}[{index}]"

    def __getitem__(self, index: int) -> Any:
        """Entry `index`, parsed; a line that is not JSON is a ConversationError."""
        text = self._buffer[self._offsets[index]:self._offsets[index + 1]]
        try:
            return json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversationError(f"not valid JSON ({e})") from None


class LlavaDataset:
    """A LLaVA-format file as training samples for a model with one image modality (see the module docstring).

    `prompter` is the tokenizer (and chat template); `images` prepares each image as the model takes it and says
    how many tokens it stands for (`FixedSizeImages`: LLaVA's one size; `PackedImages`: Qwen-VL's native
    resolution, packed with grids), and the prompter's image token becomes that many copies of the model's
    `image_token_id`. `vocab_size` is the language model's: every other token id of the tokenizer must be below
    it. `cache_samples` keeps every prepared sample in memory (small datasets: the digits). `modality` is the batch
    key of the images (the model family's name for its image modality)."""

    def __init__(self, path: str | Path, image_folder: str | Path | None, prompter: Prompter,
                 images: FixedSizeImages | PackedImages, *, modality: str, image_token_id: int,
                 max_seq_len: int, template: str = "chat", on_bad_sample: str = "skip", vocab_size: int | None = None,
                 dtype: torch.dtype = torch.float32, cache_samples: bool = False,
                 allow_paths_outside_image_folder: bool = False, max_image_pixels: int | None = None) -> None:
        """Read the file's entries (not the images) and check the tokenizer against the model."""
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {list(ON_BAD_SAMPLE)}, got {on_bad_sample!r}")
        self.entries = Entries(path)
        if len(self.entries) == 0:
            raise DataFileError(f"data file {path} holds no entries")
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.allow_outside, self.max_pixels = allow_paths_outside_image_folder, max_image_pixels
        self.modality = modality
        self.prompter = prompter
        self.template = build_template(template, prompter)
        self.images = images
        self.image_token_id, self.max_seq_len = image_token_id, max_seq_len
        self.on_bad_sample, self.dtype = on_bad_sample, dtype
        self.text_image_id = self.prompter.image_token_id()
        self.pad_id = self._pad_id()
        self._cache: dict[int, Sample | SkippedSample] | None = {} if cache_samples else None
        if vocab_size is not None:
            self._check_vocab(vocab_size)

    def _pad_id(self) -> int:
        """The tokenizer's pad token, else its EOS, else 0 (padding carries no label, so any id would do)."""
        for key in ("pad_token", "eos_token"):
            token_id = self.prompter.token_id(self.prompter.special_tokens.get(key, ""))
            if token_id is not None and token_id != self.text_image_id:
                return token_id
        return 0

    def _check_vocab(self, vocab_size: int) -> None:
        """Every token id but the image token's lies inside the language model's vocabulary."""
        ids = [i for i in self.prompter.tokenizer.get_vocab(with_added_tokens=True).values()
               if i != self.text_image_id]
        if max(ids) >= vocab_size:
            raise ValueError(f"the tokenizer has token id {max(ids)}, outside the language model's vocabulary of "
                             f"{vocab_size}; use the model's own tokenizer")

    def __len__(self) -> int:
        """Number of entries in the file (bad ones included: they are found when read)."""
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        """Sample `index`, or `BadSample` naming why it cannot be trained on (with `cache_samples`, each made
        once and kept: a sample is a pure function of its index)."""
        if self._cache is None:
            return self._make(index)
        if index not in self._cache:
            try:
                self._cache[index] = self._make(index)
            except BadSample as bad:
                self._cache[index] = bad.record
        cached = self._cache[index]
        if isinstance(cached, SkippedSample):
            raise BadSample(cached.index, cached.path, cached.reason)
        return cached

    def _make(self, index: int) -> Sample:
        """Sample `index` read, rendered, tokenized and preprocessed."""
        conversation, rendered, where = self._rendered(index)
        images = [self._image(name, index) for name in conversation.images]
        input_ids, labels = self._tokens(rendered, [image.tokens for image in images], index, where)
        items, grids = self.images.sample_items(images, self.dtype)
        return Sample(input_ids, labels, {self.modality: items}, {} if grids is None else {self.modality: grids})

    def _rendered(self, index: int) -> tuple[Conversation, Rendered, str]:
        """Entry `index` parsed and rendered by the template, and where it is; a BadSample if it cannot be."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside [0, {len(self)})")
        where = self.entries.where(index)
        try:
            conversation = parse_entry(self.entries[index])
            return conversation, self.template.render(conversation), where
        except ConversationError as e:
            raise BadSample(index, where, f"malformed conversation: {e}") from None

    def question(self, index: int) -> Question:
        """Entry `index` as a question (held-out answers, `mimo eval`): the conversation rendered up to its first
        answer, tokenized as `mimo generate` tokenizes a prompt (`Prompter.prompt_ids`), the images shown before
        it, the user's turn and the first answer as the reference; a BadSample if it cannot be asked."""
        conversation, rendered, where = self._rendered(index)
        prompt = rendered.prompt
        answer = next(k for k, turn in enumerate(conversation.turns) if turn.role == "assistant")
        images = [self._image(name, index) for name in conversation.images[:prompt.count(IMAGE)]]
        try:
            ids = self.prompter.prompt_ids(prompt, [image.tokens for image in images], self.image_token_id,
                                           len(images), rendered.add_special_tokens)
        except PromptError as e:
            raise BadSample(index, where, str(e)) from None
        if len(ids) >= self.max_seq_len:
            raise BadSample(index, where, f"the question is {len(ids)} tokens, leaving no room to answer within "
                                          f"max_seq_len={self.max_seq_len}")
        items, grids = self.images.sample_items(images, self.dtype)
        entry = self.entries[index]
        name = entry.get("id") if isinstance(entry, dict) else None
        return Question(ids, {self.modality: items}, conversation.turns[answer - 1].text,
                        conversation.turns[answer].text, None if name is None else str(name),
                        {} if grids is None else {self.modality: grids})

    def _tokens(self, rendered: Rendered, image_tokens: list[int], index: int,
                where: str) -> tuple[torch.Tensor, ...]:
        """Token ids with image i expanded to its `image_tokens[i]` tokens, and next-token labels on the tokens
        inside the rendered spans."""
        encoding = self.prompter.encode(rendered.text, rendered.add_special_tokens)
        num_images, ids, learn = len(image_tokens), [], []
        expand = iter(image_tokens)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id == self.text_image_id:
                count = next(expand, 0)
                ids += [self.image_token_id] * count
                learn += [False] * count
            else:
                ids.append(token_id)
                learn.append(end > start and any(start < b and end > a for a, b in rendered.targets))
        found = encoding.ids.count(self.text_image_id)
        if found != num_images:
            raise BadSample(index, where, f"the tokenized text holds {found} image token(s) for {num_images} "
                                          f"image(s)")
        if not any(learn):
            raise BadSample(index, where, "no assistant tokens to learn")
        if len(ids) > self.max_seq_len:
            raise BadSample(index, where, f"{len(ids)} tokens, more than max_seq_len={self.max_seq_len} "
                                          f"(dropped, never cut)")
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(learn[1:] + [False]), torch.cat([input_ids[1:], input_ids[:1]]),
                             IGNORE_INDEX)
        return input_ids, labels

    def _image(self, name: str, index: int) -> PreparedImage:
        """One image file, prepared as the model takes it (`images`); a missing, corrupt or unusable one, one
        outside the image folder (unless allowed) and one past `max_image_pixels` (read from its header, never
        decoded) is a BadSample."""
        if self.image_folder is None:
            raise BadSample(index, name, "the sample has an image but data.image_folder is not set")
        if not self.allow_outside and leaves_folder(name):
            raise BadSample(index, name, f"the image path leaves data.image_folder {self.image_folder} (set "
                                         f"data.allow_paths_outside_image_folder: true to read it)")
        path = self.image_folder / name
        try:
            with Image.open(path) as image:
                if self.max_pixels is not None and image.width * image.height > self.max_pixels:
                    raise BadSample(index, str(path), f"{image.width}x{image.height} pixels, more than "
                                                      f"data.max_image_pixels={self.max_pixels} (skipped, not decoded)")
                image.load()
                prepared = self.images.prepare(image)
        except BadSample:
            raise
        except ImageInputError as e:
            raise BadSample(index, str(path), str(e)) from None
        except FileNotFoundError:
            raise BadSample(index, str(path), "image file not found") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadSample(index, str(path), f"cannot decode the image ({e})") from None
        return PreparedImage(prepared.values.to(self.dtype), prepared.tokens, prepared.grid)

    def batch(self, indices: Sequence[int], seq_len: int | None = None) -> MimoBatch:
        """The collated samples of `indices`, a bad one handled as `on_bad_sample` says. skip: the next good
        index after it (mod len) takes its slot, a pure function of the index (so a resumed run builds the same
        batch), and the skip is recorded in `MimoBatch.skipped`; error: the BadSample (index, path, why) stops."""
        samples, skipped = [], []
        for index in indices:
            sample, record = self._sample_or_substitute(index)
            samples.append(sample)
            if record is not None:
                skipped.append(record)
        batch = MimoBatch.collate(samples, self.pad_id, seq_len)
        batch.skipped = tuple(skipped)
        return batch

    def _sample_or_substitute(self, index: int) -> tuple[Sample, SkippedSample | None]:
        """Sample `index`, or (skip) the next good one after it with the record of why `index` was skipped."""
        try:
            return self[index], None
        except BadSample as bad:
            if self.on_bad_sample == "error":
                raise
            record = bad.record
        for step in range(1, len(self)):
            try:
                return self[(index + step) % len(self)], record
            except BadSample:
                continue
        raise BadSample(index, record.path, f"every sample of {self.entries.path} is bad; this one: {record.reason}")
