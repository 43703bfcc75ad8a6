"""The run's precision, decided once from its dtype name: parameter dtype, compute dtype, loss scaling.

float32 / float64 compute in the parameters' dtype; bfloat16 / float16 are mixed precision: float32
parameters, optimizer state and gradient reduction, compute in the low dtype; float16 also needs one
dynamic loss scale for the whole model (its range is too small for small gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class PrecisionError(ValueError):
    """A dtype name that is not one of DTYPES."""


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a name in DTYPES, or a PrecisionError naming the allowed ones."""
    if name not in DTYPES:
        raise PrecisionError(f"unknown dtype {name!r}; choose one of {list(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class PrecisionPolicy:
    """Where each dtype is used: parameters (and optimizer state, gradient reduction), compute, loss scaling."""

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    loss_scaling: bool

    @property
    def mixed(self) -> bool:
        """True if compute runs in a lower dtype than the parameters."""
        return self.compute_dtype != self.param_dtype

    @classmethod
    def from_name(cls, name: str) -> PrecisionPolicy:
        """The policy of a run's `train.dtype`."""
        compute = dtype_of(name)
        param = torch.float64 if compute == torch.float64 else torch.float32
        return cls(name, param, compute, loss_scaling=compute == torch.float16)
