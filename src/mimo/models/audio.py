"""A small built-in audio encoder over log-mel frames, in the Whisper mould.

Two Conv1d layers (the second with stride 2, halving the frame rate), GELU after each, learned positions,
pre-norm transformer blocks (the same `EncoderBlock` the ViT uses) and a final LayerNorm. A fixed number
of input frames gives a fixed number of tokens per item, which is what the alignment step relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from mimo.models.encoder_block import (
    EncoderBlock,
    EncoderStage,
    block_stack,
    encoder_block_params,
    encoder_stack_tp_plan,
    stage_range,
)

_KERNEL = 3


@dataclass(frozen=True)
class AudioConfig:
    """Shape of an `AudioEncoder`: inputs are [N, n_mels, num_frames] log-mel spectrograms."""

    n_mels: int = 80
    num_frames: int = 3000
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    ffn_hidden_size: int = 1536
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"

    def __post_init__(self) -> None:
        """Reject uneven heads and empty inputs."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_frames < 1 or self.n_mels < 1:
            raise ValueError(f"n_mels and num_frames must be positive, got {self.n_mels}, {self.num_frames}")

    @property
    def num_layers_built(self) -> int:
        """Blocks the encoder runs (all of them): what pipeline stages split."""
        return self.num_layers

    @property
    def tokens_per_item(self) -> int:
        """Tokens per clip: the stride-2 conv (kernel 3, padding 1) halves the frames, rounding up."""
        return (self.num_frames + 1) // 2

    def num_params(self) -> int:
        """Closed-form parameter count of `AudioEncoder(self)`."""
        h, k = self.hidden_size, _KERNEL
        convs = (self.n_mels * k * h + h) + (h * k * h + h)
        blocks = self.num_layers * encoder_block_params(h, self.ffn_hidden_size)
        return convs + self.tokens_per_item * h + blocks + 2 * h

    @classmethod
    def tiny(cls) -> AudioConfig:
        """16 mel bins × 16 frames (8 tokens), width 32, 2 layers: CPU-test size."""
        return cls(n_mels=16, num_frames=16, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64)


class AudioEncoder(EncoderStage, nn.Module):
    """Log-mel frames [N, n_mels, frames] → tokens [N, tokens_per_item, hidden]."""

    def __init__(self, config: AudioConfig, layer_range: tuple[int, int] | None = None) -> None:
        """Build the conv stem, the position table, the blocks and the final norm; with `layer_range`, one
        pipeline stage: those blocks, the stem and positions only on the stage that starts at block 0, the final
        norm only on the one that ends the stack."""
        super().__init__()
        self.config = config
        self.num_blocks = config.num_layers
        self.layer_range = stage_range(layer_range, self.num_blocks)
        h = config.hidden_size
        if self.has_front:
            self.conv1 = nn.Conv1d(config.n_mels, h, kernel_size=_KERNEL, padding=1)
            self.conv2 = nn.Conv1d(h, h, kernel_size=_KERNEL, stride=2, padding=1)
            self.position_embedding = nn.Embedding(config.tokens_per_item, h)
        self.layers = block_stack(self.layer_range, lambda: EncoderBlock(
            h, config.num_heads, config.ffn_hidden_size, config.layer_norm_eps, config.activation))
        if self.has_end:
            self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    @property
    def stack_tokens(self) -> int:
        """Tokens per clip between blocks: what one pipeline stage hands the next."""
        return self.config.tokens_per_item

    @property
    def tokens_per_item(self) -> int:
        """Tokens this encoder emits per clip."""
        return self.config.tokens_per_item

    @property
    def hidden_size(self) -> int:
        """Width of the emitted tokens."""
        return self.config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a stack of clips [N, n_mels, num_frames] (every clip exactly `num_frames` frames). A pipeline
        stage past the first takes the stage before's hidden states [N, stack_tokens, hidden] instead, and one
        before the last returns its own."""
        if self.has_front:
            expected = (self.config.n_mels, self.config.num_frames)
            if x.dim() != 3 or tuple(x.shape[1:]) != expected:
                raise ValueError(f"expected log-mel features [N, {expected[0]}, {expected[1]}], "
                                 f"got {tuple(x.shape)}")
            x = F.gelu(self.conv1(x.to(self.conv1.weight.dtype)))
            x = F.gelu(self.conv2(x)).transpose(1, 2)
            x = x + self.position_embedding.weight
        for layer in self.layers.values():
            x = layer(x)
        return self.layer_norm(x) if self.has_end else x

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
        """Shard every block's attention and MLP; the conv stem, positions and norms stay replicated
        (with `sequence_parallel`, the blocks' norms run on sequence shards)."""
        return encoder_stack_tp_plan("layers.", self.layers.keys(), sequence_parallel)
