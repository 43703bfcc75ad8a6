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

    family: Literal["builtin"] = "builtin"  # the model family: mimo's own seeded modules
    language: Literal["tiny", "1b", "3b", "7b"] = "tiny"  # the Llama-style decoder's preset (7b: Vicuna-7B's shape)
    images: Literal["tiny", "clip-vit-l14-336"] | None = "tiny"  # the CLIP-style ViT's shapes; null: no images
    audio: Literal["tiny"] | None = "tiny"  # the audio encoder's shapes (log-mel clips); null: no audio
    freeze_language_model: bool = False  # the decoder's weights do not train
    freeze_encoders: list[str] = field(default_factory=list)  # modalities whose encoder does not train
    freeze_projections: list[str] = field(default_factory=list)  # modalities whose projector does not train

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
