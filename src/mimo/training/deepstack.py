"""DeepStack's features across the language pipeline: which blocks a stage applies and which it passes on.

Qwen3-VL adds visual features after decoder layers `DecoderConfig.deepstack_layers` (ascending) at the image
tokens' positions. They reach stage 0 inside the image rows, [n, H·(1 + k)] (`JoinDeepStack`): the first H columns
are embedded, block i is added after layer i. A stage holding layers [start, end) applies the blocks of its layers
and sends the blocks of later layers with its activations; a later stage receives [n, H·j] (the j layers at or past
its start), finds the positions on its host ids (every language rank holds them) and does the same. Exact: the
same rows are added at the same positions as in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo.models.decoder import AddedAfterLayer


@dataclass(frozen=True)
class DeepStackCarry:
    """The DeepStack blocks a stage of layers `layer_range` receives, applies and passes on."""

    hidden_size: int
    layers: tuple[int, ...]  # every DeepStack layer of the model, ascending
    layer_range: tuple[int, int]

    @property
    def received(self) -> tuple[int, ...]:
        """The layers whose blocks reach this stage (stage 0: all, inside the wide rows)."""
        return tuple(i for i in self.layers if i >= self.layer_range[0])

    @property
    def passed(self) -> tuple[int, ...]:
        """The layers whose blocks this stage sends on: those of later stages."""
        return tuple(i for i in self.layers if i >= self.layer_range[1])

    def received_width(self) -> int:
        """Columns of the blocks a later stage receives (0: nothing beside the hidden states)."""
        return self.hidden_size * len(self.received) if self.layer_range[0] > 0 else 0

    def onward(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The blocks to send on, [n, H·len(passed)], from stage 0's wide rows [n, H·(1 + k)] or a later stage's
        received blocks; None when no later stage needs any."""
        if not self.passed:
            return None
        skip = len(self.received) - len(self.passed) + (1 if self.layer_range[0] == 0 else 0)
        return rows[:, self.hidden_size * skip:]

    def added(self, where: torch.Tensor, blocks: torch.Tensor) -> AddedAfterLayer:
        """A later stage's `added_after_layer`: each received block of a layer it holds, at `where`."""
        h, end = self.hidden_size, self.layer_range[1]
        return {layer: (where, blocks[:, h * i:h * (i + 1)])
                for i, layer in enumerate(self.received) if layer < end}
