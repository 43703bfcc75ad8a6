"""A CLIP-style vision transformer that turns images into a sequence of patch embeddings.

The mould is OpenAI's CLIP vision tower as LLaVA uses it: bias-free conv patch embedding, a class token,
learned positions, a LayerNorm before the first block ("pre_layrnorm", CLIP's spelling), pre-norm blocks
with quick_gelu, and the output of a selected layer (LLaVA: the penultimate) rather than the last one.
Only the layers up to the selected one are built, so no parameter is left without a gradient. Names
follow Hugging Face's `CLIPVisionTransformer` so pretrained weights load by name.

SigLIP's tower is the same stack in a second mould (`ViTConfig.siglip`): a biased patch embedding, no class
token, no pre-LayerNorm, tanh-GELU; its attention-pooling head is not built (LLaVA reads hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT encoder; `select_layer` indexes hidden states like HF (0 = embeddings, -1 = last)."""

    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    layer_norm_eps: float = 1e-5
    select_layer: int = -2
    drop_class_token: bool = True  # drop the first token (HF LLaVA's "default" strategy; with no class token,
    # that is the first patch, as HF does)
    activation: str = "quick_gelu"
    class_token: bool = True  # CLIP: a learned class token in front; SigLIP: none
    pre_layernorm: bool = True  # CLIP: LayerNorm before the first block; SigLIP: none
    patch_bias: bool = False  # SigLIP's patch embedding has a bias, CLIP's has none

    def __post_init__(self) -> None:
        """Reject shapes that cannot build: partial patches, uneven heads, an out-of-range layer."""
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"select_layer {self.select_layer} is outside [-{self.num_layers + 1}, {self.num_layers}] "
                f"for a {self.num_layers}-layer encoder"
            )

    @property
    def num_patches(self) -> int:
        """Patches per image: (image_size / patch_size)²."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Output tokens per image: one per patch, plus the class token, less the first token if dropped."""
        return self.num_patches + int(self.class_token) - int(self.drop_class_token)

    @property
    def tokens_per_item(self) -> int:
        """`tokens_per_image` under the name every modality's config answers to (an image is the item)."""
        return self.tokens_per_image

    @property
    def num_layers_built(self) -> int:
        """How many blocks run (and are built) to reach `select_layer`."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    def num_params(self) -> int:
        """Closed-form parameter count of `ViTEncoder(self)` (built layers only)."""
        h, cls = self.hidden_size, int(self.class_token)
        patches = self.num_channels * self.patch_size**2 * h + (h if self.patch_bias else 0)
        embeddings = patches + cls * h + (self.num_patches + cls) * h
        blocks = self.num_layers_built * encoder_block_params(h, self.ffn_hidden_size)
        return embeddings + (2 * h if self.pre_layernorm else 0) + blocks

    @classmethod
    def clip_vit_l14_336(cls) -> ViTConfig:
        """OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): 576 tokens of width 1024."""
        return cls(image_size=336, patch_size=14)

    @classmethod
    def siglip(cls, **fields: object) -> ViTConfig:
        """A SigLIP tower (no class token, no pre-LayerNorm, biased patches, tanh-GELU) of the given shape."""
        defaults = {"class_token": False, "pre_layernorm": False, "patch_bias": True,
                    "activation": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
        return cls(**{**defaults, **fields})

    @classmethod
    def tiny(cls) -> ViTConfig:
        """8×8 RGB images in 2×2 patches (16 tokens), width 32, 3 layers of which 2 run: CPU-test size."""
        return cls(image_size=8, patch_size=2, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=64)


class ViTEmbeddings(nn.Module):
    """Patches → tokens, with a class token in front and learned absolute positions added."""

    def __init__(self, config: ViTConfig) -> None:
        """Build the conv patch embedding (CLIP: no bias), the class token and the position table."""
        super().__init__()
        h = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(h))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, h, kernel_size=config.patch_size, stride=config.patch_size, bias=config.patch_bias
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, h)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] → [N, 1 + patches, hidden]."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class PatchEmbeddings(nn.Module):
    """SigLIP's embeddings: patches → tokens (biased conv), learned positions added, no class token."""

    def __init__(self, config: ViTConfig) -> None:
        """Build the conv patch embedding and the position table (one row per patch)."""
        super().__init__()
        h = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, h, kernel_size=config.patch_size, stride=config.patch_size, bias=config.patch_bias
        )
        self.position_embedding = nn.Embedding(config.num_patches, h)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] → [N, patches, hidden]."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class ViTLayers(nn.Module):
    """The stack of encoder blocks (a module of its own so names read `encoder.layers.N`, as in CLIP); a pipeline
    stage holds blocks [start, end) under their global N."""

    def __init__(self, config: ViTConfig, layer_range: tuple[int, int] | None = None) -> None:
        """Build the blocks of `layer_range` (`ViTEncoder`'s, checked there; default: every block that runs up to
        `select_layer`)."""
        super().__init__()
        self.layers = block_stack(layer_range or (0, config.num_layers_built), lambda: EncoderBlock(
            config.hidden_size,
            config.num_heads,
            config.ffn_hidden_size,
            config.layer_norm_eps,
            config.activation,
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every built block in order."""
        for layer in self.layers.values():
            x = layer(x)
        return x


class ViTEncoder(EncoderStage, nn.Module):
    """CLIP (or SigLIP) vision tower: images [N, C, H, W] → features [N, tokens_per_item, hidden] of `select_layer`."""

    def __init__(self, config: ViTConfig, layer_range: tuple[int, int] | None = None) -> None:
        """Build embeddings, the pre-LayerNorm and the blocks up to the selected layer; with `layer_range`, one
        pipeline stage: those blocks, the embeddings and pre-LayerNorm only on the stage that starts at block 0."""
        super().__init__()
        self.config = config
        self.num_blocks = config.num_layers_built
        self.layer_range = stage_range(layer_range, self.num_blocks)
        if self.has_front:
            self.embeddings = ViTEmbeddings(config) if config.class_token else PatchEmbeddings(config)
            self.pre_layrnorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layernorm
                                 else nn.Identity())
        self.encoder = ViTLayers(config, self.layer_range)

    @property
    def stack_tokens(self) -> int:
        """Tokens per image between blocks (the class token too): what one pipeline stage hands the next."""
        return self.config.num_patches + int(self.config.class_token)

    @property
    def tokens_per_item(self) -> int:
        """Tokens this encoder emits per image."""
        return self.config.tokens_per_item

    @property
    def hidden_size(self) -> int:
        """Width of the emitted tokens."""
        return self.config.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a stack of images [N, C, H, W]; the first token is dropped if the config says so. A pipeline
        stage past the first takes the stage before's hidden states [N, stack_tokens, hidden] instead, and one
        before the last returns its own."""
        if self.has_front:
            size = self.config.image_size
            if x.dim() != 4 or tuple(x.shape[-2:]) != (size, size):
                raise ValueError(f"expected pixel_values [N, C, {size}, {size}], got {tuple(x.shape)}")
            x = self.pre_layrnorm(self.embeddings(x))
        x = self.encoder(x)
        return x[:, 1:] if self.has_end and self.config.drop_class_token else x

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
        """Shard every block's attention and MLP (Megatron style); embeddings and norms stay replicated
        (with `sequence_parallel`, the blocks' norms run on sequence shards)."""
        return encoder_stack_tp_plan("encoder.layers.", self.encoder.layers.keys(), sequence_parallel)
