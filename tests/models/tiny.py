"""The tiny LLaVA-like model the model tests build: ViT tiny → MLP projector → decoder tiny, optionally audio."""

from __future__ import annotations

from mimo.models import (
    AudioConfig,
    AudioEncoder,
    Decoder,
    DecoderConfig,
    MimoModel,
    MLPProjector,
    ModalitySubmodule,
    ViTConfig,
    ViTEncoder,
)


def tiny_llava(image_id: int, audio_id: int | None = None) -> MimoModel:
    """Uninitialized, on the current default device (e.g. under `torch.device("meta")`); an audio branch
    too when `audio_id` is given. Initialize with `init_parameters`."""
    hidden = DecoderConfig.tiny().hidden_size
    subs = {"images": ModalitySubmodule(ViTEncoder(ViTConfig.tiny()), MLPProjector(32, hidden))}
    ids = {"images": image_id}
    if audio_id is not None:
        subs["audio"] = ModalitySubmodule(AudioEncoder(AudioConfig.tiny()), MLPProjector(32, hidden))
        ids["audio"] = audio_id
    return MimoModel(Decoder(DecoderConfig.tiny()), subs, ids)
