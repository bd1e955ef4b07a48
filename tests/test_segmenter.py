"""The predictor's own arithmetic: labels at the input size without full-size class maps, image conversion."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskclip_apro.data.io import load_image
from maskclip_apro.segmenter import labels_at, to_tensor


def _probs(b, k, h, w, seed=0, sharpness=1.0):
    return torch.softmax(sharpness * torch.randn(b, k, h, w, generator=torch.Generator().manual_seed(seed)), dim=1)


def _oracle(probs: np.ndarray, size) -> np.ndarray:
    """Brute-force loop: each output pixel's four taps and weights by the align_corners=False rule,
    the same float32 products and sums for every class, then the first maximum."""
    b, k, h, w = probs.shape
    height, width = size

    def taps(n_in, n_out, j):
        src = max((j + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = np.float32(min(max(src - i0, 0.0), 1.0))
        return i0, i1, np.float32(1) - w1, w1

    out = np.zeros((b, height, width), np.int64)
    rows = [taps(h, height, y) for y in range(height)]
    cols = [taps(w, width, x) for x in range(width)]
    for n in range(b):
        for y, (r0, r1, a0, a1) in enumerate(rows):
            for x, (c0, c1, b0, b1) in enumerate(cols):
                p = probs[n]
                upper = p[:, r0, c0] * b0 + p[:, r0, c1] * b1
                lower = p[:, r1, c0] * b0 + p[:, r1, c1] * b1
                out[n, y, x] = int(np.argmax(upper * a0 + lower * a1))
    return out


@pytest.mark.parametrize("shape, size", [((2, 7, 5, 6), (23, 17)), ((1, 4, 1, 7), (9, 20)), ((1, 5, 9, 8), (4, 3)),
                                         ((1, 3, 1, 1), (5, 4)), ((1, 6, 6, 6), (6, 6))])
def test_labels_equal_a_brute_force_loop_for_every_tiling(shape, size):
    probs = _probs(*shape, seed=sum(shape))
    expected = torch.from_numpy(_oracle(probs.numpy(), size))
    for tile in (1, 5, 13, 1 << 21):  # one value at a time, tiles cutting rows and cells, all at once
        for prune in (True, False):
            assert torch.equal(labels_at(probs, size, tile_elements=tile, prune=prune), expected)


def test_ties_and_near_ties_go_where_the_full_computation_puts_them():
    """Flat maps (every class tied), exact two-class ties and gaps below the pruning margin."""
    probs = torch.full((1, 4, 6, 7), 0.25)
    probs[0, :, 3:, :] = torch.tensor([0.1, 0.4, 0.4, 0.1])[:, None, None]
    probs[0, 1, 0, 0] += 1e-7
    probs[0, 2, 5, 6] += 3e-6
    size = (17, 19)
    expected = torch.from_numpy(_oracle(probs.numpy(), size))
    for tile in (1, 7, 1 << 21):
        for prune in (True, False):
            assert torch.equal(labels_at(probs, size, tile_elements=tile, prune=prune), expected)


@pytest.mark.parametrize("shape, size", [((2, 7, 5, 6), (23, 17)), ((1, 21, 24, 32), (301, 199)), ((1, 5, 40, 40), (13, 17))])
def test_labels_agree_with_the_argmax_of_f_interpolate_away_from_ties(shape, size):
    probs = _probs(*shape, sharpness=3.0)
    full = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    top2 = full.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # float rounding differs below this
    labels = labels_at(probs, size)
    assert clear.float().mean() > 0.99
    assert torch.equal(labels[clear], full.argmax(1)[clear])


def test_labels_of_a_large_image_stay_within_a_small_memory_budget(tmp_path):
    """21 classes to 2000 x 3000: full-size class maps would take 504 MB; the labels take 48 MB."""
    script = textwrap.dedent(
        """
        import resource, torch, torch.nn.functional as F
        from maskclip_apro.segmenter import labels_at
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        regions = F.interpolate(torch.randint(0, 21, (1, 1, 9, 13), generator=g).float(), size=(72, 96)).long()[:, 0]
        probs = torch.softmax(6 * F.one_hot(regions, 21).permute(0, 3, 1, 2).float()
                              + 0.3 * torch.randn(1, 21, 72, 96, generator=g), dim=1)
        labels_at(probs, (20, 30))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        labels = labels_at(probs, (2000, 3000))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, int(labels.max()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_mb, top = done.stdout.split()
    assert float(grown_mb) < 200 and 0 < int(top) < 21


def test_paths_pil_images_and_arrays_convert_alike(tmp_path):
    rgba = np.dstack([np.full((4, 5, 3), 10, np.uint8), np.full((4, 5), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    from_path = load_image(tmp_path / "a.png")
    assert from_path[0, 0].tolist() == [255, 255, 255] and from_path[1, 1].tolist() == [10, 10, 10]
    np.testing.assert_array_equal(load_image(Image.open(tmp_path / "a.png")), from_path)
    np.testing.assert_array_equal(load_image(rgba), from_path)
    gray = np.full((4, 5), 7, np.uint8)
    assert (load_image(gray) == 7).all() and load_image(gray).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 5, 3), np.float32))
    x = to_tensor(np.full((2, 3, 3), 255, np.uint8))
    assert x.shape == (1, 3, 2, 3) and float(x.max()) == 1.0
