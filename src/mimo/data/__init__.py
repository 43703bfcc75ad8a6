"""Batches, samplers, the built-in datasets and LLaVA-format data."""

from mimo.data.bad_samples import BadSample, SkippedSample
from mimo.data.batch import MimoBatch, Sample
from mimo.data.conversation import Conversation, ConversationError, Turn, parse_entry
from mimo.data.digits import WORDS, DigitsDataset, DigitsTokenizer, digits_split, load_digit_scans
from mimo.data.labels import loss_token_mask, next_token_labels
from mimo.data.llava import LlavaDataset
from mimo.data.prefetch import BatchPrefetcher
from mimo.data.sampler import GlobalBatchSampler
from mimo.data.scan import DataFileError
from mimo.data.synthetic import ModalitySpec, SyntheticDataset

__all__ = [
    "WORDS",
    "BadSample",
    "BatchPrefetcher",
    "Conversation",
    "ConversationError",
    "DataFileError",
    "DigitsDataset",
    "DigitsTokenizer",
    "GlobalBatchSampler",
    "LlavaDataset",
    "MimoBatch",
    "ModalitySpec",
    "Sample",
    "SkippedSample",
    "SyntheticDataset",
    "Turn",
    "digits_split",
    "load_digit_scans",
    "loss_token_mask",
    "next_token_labels",
    "parse_entry",
]
