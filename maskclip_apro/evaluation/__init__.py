"""Segmentation metrics."""

from .metric import ConfusionMatrix
from .table import format_table

__all__ = ["ConfusionMatrix", "format_table"]
