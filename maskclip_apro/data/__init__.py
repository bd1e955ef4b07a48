"""Datasets, image/label IO and class vocabularies."""

from .base import IGNORE_INDEX, Sample
from .build import DATASET_NAMES, build_dataset
from .palette import voc_palette
from .vocab import BUILTIN_VOCABS, load_vocab, primary_name, split_synonyms

__all__ = [
    "BUILTIN_VOCABS",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "Sample",
    "build_dataset",
    "load_vocab",
    "primary_name",
    "split_synonyms",
    "voc_palette",
]
