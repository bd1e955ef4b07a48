"""The predictor's own arithmetic: chunked upsample-then-argmax and image conversion."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskclip_apro.segmenter import labels_at, to_array, to_tensor


@pytest.mark.parametrize("chunk", [1, 2, 3, 32])
def test_chunked_labels_equal_the_argmax_of_the_full_upsampling(chunk):
    probs = torch.softmax(torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    full = F.interpolate(probs, size=(23, 17), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(labels_at(probs, (23, 17), chunk=chunk), full)


def test_images_of_every_kind_become_rgb_uint8():
    rgba = Image.fromarray(np.dstack([np.full((4, 5, 3), 10, np.uint8), np.full((4, 5), 255, np.uint8)]), "RGBA")
    gray = np.full((4, 5), 7, np.uint8)
    assert to_array(rgba).shape == (4, 5, 3) and to_array(rgba).dtype == np.uint8
    assert (to_array(gray) == 7).all() and to_array(gray).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_array(np.zeros((4, 5, 3), np.float32))
    x = to_tensor(np.full((2, 3, 3), 255, np.uint8))
    assert x.shape == (1, 3, 2, 3) and float(x.max()) == 1.0
