"""Dense unary generators: an open_clip image tower (ViT or ResNet) whose last block is rebuilt for
dense prediction (MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP), a cached text classifier, and the
test geometry of a protocol (MaskCLIP's whole image or windows, or the SCLIP-family harness)."""

from .build import build_generator
from .maskclip import GeneratorOutput, MaskCLIPGenerator
from .templates import CLIP_TEMPLATES, MASKCLIP_TEMPLATES

__all__ = ["build_generator", "MaskCLIPGenerator", "GeneratorOutput", "MASKCLIP_TEMPLATES", "CLIP_TEMPLATES"]
