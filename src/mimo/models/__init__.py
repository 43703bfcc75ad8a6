"""Built-in modules (ViT, audio encoder, MLP projector, Llama-style decoder), MimoModel and its init."""

from mimo.models.audio import AudioConfig, AudioEncoder
from mimo.models.decoder import Decoder, DecoderConfig
from mimo.models.encoder_block import EncoderBlock
from mimo.models.init import init_parameters, param_seed, reset_buffers
from mimo.models.labels import IGNORE_INDEX
from mimo.models.mimo_model import MimoModel, ModalityBatch, ModalitySubmodule
from mimo.models.projector import MLPProjector
from mimo.models.rmsnorm import RMSNorm
from mimo.models.stub import MimoStubModel
from mimo.models.vit import ViTConfig, ViTEncoder

__all__ = [
    "IGNORE_INDEX",
    "AudioConfig",
    "AudioEncoder",
    "Decoder",
    "DecoderConfig",
    "EncoderBlock",
    "MLPProjector",
    "MimoModel",
    "MimoStubModel",
    "ModalityBatch",
    "ModalitySubmodule",
    "RMSNorm",
    "ViTConfig",
    "ViTEncoder",
    "init_parameters",
    "param_seed",
    "reset_buffers",
]
