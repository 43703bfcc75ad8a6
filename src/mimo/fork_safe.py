"""Asking about CUDA before any worker starts without initializing it: a forked child cannot use a CUDA context
its parent created (`launch.start_method`), and torch's runtime check (`torch.cuda.is_available()`) creates one
unless it is told to ask NVML instead."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any
from unittest import mock

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # torch checks CUDA through NVML (which leaves fork usable)


def nvml_check() -> AbstractContextManager[Any]:
    """A context in which torch's CUDA availability checks go through NVML (torch's launcher asks one too)."""
    return mock.patch.dict(os.environ, {NVML_CHECK: "1"})


def cuda_present() -> bool:
    """Whether this machine has a CUDA GPU, the CUDA runtime left uninitialized: what the parent's checks ask."""
    with nvml_check():
        return torch.cuda.is_available()
