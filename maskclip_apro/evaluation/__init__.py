"""Segmentation metrics and their tables (the runner that scores refiner chains on a dataset is
maskclip_apro.pipeline.score)."""

from .metric import ConfusionMatrix
from .table import format_table, methods_table

__all__ = ["ConfusionMatrix", "format_table", "methods_table"]
