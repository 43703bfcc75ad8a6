"""Shared fixtures: the tiny LLaVA in float64, built once (its build is the slow part of these tests)."""

from __future__ import annotations

import pytest
import torch

from mimo.families.llava import LlavaMimoProvider
from mimo.models import MimoModel


@pytest.fixture(scope="session")
def tiny_llava() -> MimoModel:
    """`LlavaMimoProvider.preset("tiny")` in float64: images 3×8×8 → 16 tokens, vocab 256, image id 256."""
    return LlavaMimoProvider.preset("tiny", params_dtype=torch.float64).provide()
