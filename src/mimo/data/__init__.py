"""Batches, samplers and the built-in datasets."""

from mimo.data.bad_samples import BadSample, SkippedSample
from mimo.data.batch import MimoBatch, Sample
from mimo.data.digits import WORDS, DigitsDataset, DigitsTokenizer, digits_split, load_digit_scans
from mimo.data.labels import loss_token_mask, next_token_labels
from mimo.data.prefetch import BatchPrefetcher
from mimo.data.sampler import GlobalBatchSampler
from mimo.data.synthetic import ModalitySpec, SyntheticDataset

__all__ = [
    "WORDS",
    "BadSample",
    "BatchPrefetcher",
    "DigitsDataset",
    "DigitsTokenizer",
    "GlobalBatchSampler",
    "MimoBatch",
    "ModalitySpec",
    "Sample",
    "SkippedSample",
    "SyntheticDataset",
    "digits_split",
    "load_digit_scans",
    "loss_token_mask",
    "next_token_labels",
]
