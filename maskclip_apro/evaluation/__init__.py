"""Segmentation metrics, their tables, and the runner that scores refiner chains on a dataset
(evaluation.runner, imported on its own: it brings the model code)."""

from .metric import ConfusionMatrix
from .table import format_table, methods_table

__all__ = ["ConfusionMatrix", "format_table", "methods_table"]
