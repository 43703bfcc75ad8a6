"""The model of a stub rank: a rank in no module's span."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mimo.models.mimo_model import MimoModel


class MimoStubModel(MimoModel):
    """An empty `MimoModel` (no language model, no modalities, no parameters): code that walks a model's
    parts walks nothing here, and the rank only takes part in world-wide collectives."""

    def __init__(self, special_token_ids: Mapping[str, int] | None = None) -> None:
        """Nothing hosted; the special token ids (if given) still say which positions carry no label."""
        super().__init__(None, {}, special_token_ids or {})

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing when called empty; raise if handed data, which would be a routing bug upstream."""
        given = [a for a in (*args, *kwargs.values()) if a is not None]
        if given:
            raise RuntimeError(
                "MimoStubModel.forward was called with data, but this rank is a stub rank: it is in no "
                "module's span and holds no part of the model. Data must be routed only to module ranks."
            )
