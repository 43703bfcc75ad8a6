"""A modality submodule given no items (a text-only micro-batch) never runs a kernel on an empty batch.

On CUDA, scaled_dot_product_attention returned None for a batch of 0 items, so the one-process forward
(`MimoModel.forward`: the parity reference, evaluation, generation) crashed on text-only micro-batches; CPU
kernels accept empty batches, so this checks the shapes the encoder is given instead.
"""

from __future__ import annotations

import torch

from tests.test_provider import make_provider


def test_no_items_encode_one_zero_item_and_keep_no_rows():
    model = make_provider(None, seed=3).provide()
    sub = model.modality_submodules["images"]
    seen = []
    sub.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    config = sub.encoder.config
    items = torch.zeros(0, config.num_channels, config.image_size, config.image_size)
    out = sub(items)
    assert seen == [1]
    assert out.shape == (0, model.language_model.config.hidden_size)  # [tokens, H], in item order
    out.sum().backward()
    grads = [p.grad for p in sub.parameters()]
    assert all(g is not None and not g.any() for g in grads)
