"""MaskCLIP+ student: DeepLabv2 trained on (APro-refined) MaskCLIP pseudo labels."""

from .checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint, save_model
from .deeplabv2 import ASPPv2, DeepLabV2
from .teacher import TARGET_MODES, Targets, Teacher
from .trainer import Trainer, default_iters

__all__ = [
    "ASPPv2",
    "DeepLabV2",
    "TARGET_MODES",
    "Targets",
    "Teacher",
    "Trainer",
    "default_iters",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_model",
]
