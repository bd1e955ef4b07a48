"""Student inference under a dataset's test protocol (mmseg 0.x's test pipeline and inference modes).

The image is rescaled keeping its aspect ratio to the dataset's img_scale (maskclip_apro.geometry:
short side 512 for VOC / COCO-Stuff, long side 520 for Pascal Context), bilinearly as cv2 does on
8-bit images; the student runs on the whole rescaled image ("whole", the MaskCLIP+ configs' test
mode) or on overlapping windows whose logits are averaged per pixel ("slide", mmseg's
slide_inference, via maskclip_apro.generator.slide); the logits are resized bilinearly to the
original size before the argmax.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..generator.slide import slide_average
from ..geometry import rescale_size
from .augment import resize_uint8

EVAL_MODES = ("whole", "slide")


def slide_stride(window: int) -> int:
    """mmseg's stride for a sliding window: two thirds of it (512 -> 341, 480 -> 320)."""
    return max(1, (2 * int(window)) // 3)


@torch.no_grad()
def predict(
    model: nn.Module,
    image: np.ndarray,
    img_scale: Optional[Sequence[int]] = None,
    mode: str = "whole",
    window: int = 512,
    stride: Optional[int] = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Labels (H, W) int64 of a uint8 (H, W, 3) image, and the (h, w) the model saw.

    img_scale None keeps the image's size. stride None: slide_stride(window).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"eval.mode must be one of {EVAL_MODES}, got {mode!r}")
    h, w = image.shape[:2]
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1)
    size = (h, w) if img_scale is None else rescale_size(h, w, img_scale)
    x = resize_uint8(x, size)[None].float().div_(255.0)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        if mode == "whole":
            logits = model(x)
        else:
            logits = slide_average(model, x, int(window), int(stride) if stride else slide_stride(window))
    logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)[0], size
