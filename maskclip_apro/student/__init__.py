"""MaskCLIP+ student: DeepLabv2 trained on (APro-refined) MaskCLIP pseudo labels."""

from .checkpoint import latest_checkpoint, load_checkpoint, load_model, save_checkpoint, save_model
from .deeplabv2 import ASPPFeatures, ASPPv2, DeepLabV2, TextEmbeddingClassifier, sync_batchnorm
from .inference import predict
from .teacher import Targets, Teacher
from .trainer import Trainer, find_latest_run, per_dataset

__all__ = [
    "ASPPFeatures",
    "ASPPv2",
    "DeepLabV2",
    "Targets",
    "Teacher",
    "TextEmbeddingClassifier",
    "Trainer",
    "find_latest_run",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "per_dataset",
    "predict",
    "save_checkpoint",
    "save_model",
    "sync_batchnorm",
]
