"""Datasets, image and label readers, class vocabularies (docs/data.md)."""

from .base import Sample
from .build import DATASET_NAMES, build_dataset
from .vocab import BUILTIN_VOCABS, load_vocab, primary_name, split_synonyms

__all__ = [
    "BUILTIN_VOCABS",
    "DATASET_NAMES",
    "Sample",
    "build_dataset",
    "load_vocab",
    "primary_name",
    "split_synonyms",
]
