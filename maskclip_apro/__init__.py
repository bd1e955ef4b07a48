"""maskclip_apro: annotation-free semantic segmentation with CLIP (MaskCLIP + APro)."""

from .segmenter import Prediction, Segmenter

__version__ = "0.1.0"
__all__ = ["Segmenter", "Prediction", "__version__"]
