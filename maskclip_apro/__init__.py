"""maskclip_apro: annotation-free semantic segmentation with CLIP (MaskCLIP + APro).

`Segmenter` and `Prediction` load on first use, so that `import maskclip_apro.<module>` (the
commands' entry points, a config check) does not import torch and open_clip first.
"""

from typing import Any

__version__ = "0.2.0"
__all__ = ["Segmenter", "Prediction", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "Prediction"):
        from . import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'maskclip_apro' has no attribute {name!r}")
