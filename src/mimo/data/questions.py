"""A held-out sample as a question to answer (the prompt up to its first answer, its items, the reference answer),
and a held-out file's questions as a model family serves them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Question:
    """`input_ids`: the prompt's token ids (items expanded to the model's special ids), as `mimo generate` makes
    them; `items`: per modality [k, ...]; `text`: the user's turn as written (`<image>` where each image sits);
    `reference`: the first answer of the data; `name`: the entry's own id, if it has one; `item_grids`: per modality
    of packed items, their grids (as `Sample`'s)."""

    input_ids: list[int]
    items: dict[str, torch.Tensor]
    text: str
    reference: str
    name: str | None = None
    item_grids: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldOutQuestions:
    """A held-out file as a model family reads it for answering: `dataset` (`len`, and `question(index)`, a
    `Question` or a `BadSample`), the ids generation stops at, and how generated ids become text."""

    dataset: Any
    eos_ids: list[int]
    decode: Callable[[list[int]], str]
