"""The built-in family's `model` section: which of mimo's reference encoders, at which shapes, and what to freeze."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mimo.config import RunConfigError


@dataclass
class BuiltinSection:
    """mimo's own modules, seeded (no Hugging Face weights): a Llama-style decoder and, per modality, its encoder
    and an MLP projector. `images`: a CLIP-style ViT's shapes; `audio`: the audio encoder's (log-mel clips);
    null leaves the modality out. `freeze_encoders` / `freeze_projections` name modalities."""

    family: Literal["builtin"] = "builtin"
    language: Literal["tiny", "1b", "3b", "7b"] = "tiny"
    images: Literal["tiny", "clip-vit-l14-336"] | None = "tiny"
    audio: Literal["tiny"] | None = "tiny"
    freeze_language_model: bool = False
    freeze_encoders: list[str] = field(default_factory=list)
    freeze_projections: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """At least one modality; freezing names only the section's modalities."""
        if not self.modalities:
            raise RunConfigError("model: the builtin family needs at least one modality (images or audio)")
        for key in ("freeze_encoders", "freeze_projections"):
            unknown = sorted(set(getattr(self, key)) - set(self.modalities))
            if unknown:
                raise RunConfigError(f"model.{key}: {unknown} are not modalities of this model; its modalities "
                                     f"are {self.modalities}")

    @property
    def modalities(self) -> list[str]:
        """The modalities the section asks for, in a fixed order (images, then audio)."""
        return [m for m in ("images", "audio") if getattr(self, m) is not None]
