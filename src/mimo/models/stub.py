"""The model of a stub rank: a rank in no module's span."""

from __future__ import annotations

from typing import Any

from torch import nn


class MimoStubModel(nn.Module):
    """No parameters, no data: a stub rank only takes part in world-wide collectives."""

    is_stub = True

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing when called empty; raise if handed data, which would be a routing bug upstream."""
        given = [a for a in (*args, *kwargs.values()) if a is not None]
        if given:
            raise RuntimeError(
                "MimoStubModel.forward was called with data, but this rank is a stub rank: it is in no "
                "module's span and holds no part of the model. Data must be routed only to module ranks."
            )
