"""Fixtures shared by the Hugging Face tests: each is one `mimo train` run, made once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def unchanged_llava(tmp_path_factory):
    """A CLIP + Llama HF directory (with its processor) and a one-rank checkpoint of it trained at lr 0, so its
    weights are the source's: shared by the round trip and `mimo generate --checkpoint` (one run, not two)."""
    from tests.hf import tiny_hf
    from tests.hf.runs import ONE_RANK, train

    root = tmp_path_factory.mktemp("unchanged_llava")
    source = root / "source"
    tiny_hf.save_llava(source)
    tiny_hf.processor().save_pretrained(source)
    return source, train(root, {"hf": str(source)}, ONE_RANK, lr=0.0)
