"""MaskCLIP dense unary generator: open_clip image tower (ViT or ResNet) plus a cached text classifier."""

from .maskclip import GeneratorOutput, MaskCLIPGenerator, build_generator
from .templates import CLIP_TEMPLATES, MASKCLIP_TEMPLATES

__all__ = ["build_generator", "MaskCLIPGenerator", "GeneratorOutput", "MASKCLIP_TEMPLATES", "CLIP_TEMPLATES"]
