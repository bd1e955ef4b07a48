"""Student training data: mmseg's augmentation rules, void masking, VOC train_aug."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskclip_apro.data import build_dataset
from maskclip_apro.student.augment import (
    AugmentParams,
    PhotometricDraws,
    augment,
    crop_box,
    draw_photometric,
    photometric_distortion,
    random_scale_size,
    rng_for,
)
from maskclip_apro.student.data import TrainCrops

F32 = np.float32


def cv_rgb2hsv(r: int, g: int, b: int) -> tuple[int, int, int]:
    """OpenCV's 8-bit RGB -> HSV for one pixel (fixed point, 12 fractional bits, H in [0, 180))."""
    v, vmin = max(r, g, b), min(r, g, b)
    diff = v - vmin
    s = (diff * (round(255 * 4096 / v) if v else 0) + 2048) >> 12
    if v == r:
        h = g - b
    elif v == g:
        h = b - r + 2 * diff
    else:
        h = r - g + 4 * diff
    h = (h * (round(180 * 4096 / (6 * diff)) if diff else 0) + 2048) >> 12
    return h + 180 if h < 0 else h, s, v


def cv_hsv2rgb(h: int, s: int, v: int) -> tuple[int, int, int]:
    """OpenCV's vectorised 8-bit HSV -> RGB for one pixel: float32, 1 - a*b fused, truncated."""
    hh = F32(h) * (F32(6) / F32(180))
    sector = int(hh)
    hh = F32(hh - F32(sector))
    sat, val = F32(s) * (F32(1) / F32(255)), F32(v) * (F32(1) / F32(255))

    def fused(a, x):
        return F32(1.0 - np.float64(a) * np.float64(x))

    p, q, t = F32(val * F32(F32(1) - sat)), F32(val * fused(sat, hh)), F32(val * fused(sat, F32(F32(1) - hh)))
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][sector % 6]
    return tuple(int(np.trunc(F32(c * F32(255)))) for c in rgb)


def mmseg_photometric(img: np.ndarray, d: PhotometricDraws) -> np.ndarray:
    """mmseg 0.x PhotoMetricDistortion.__call__ for given draws, HSV through the per-pixel oracles."""

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def hsv_of(x):
        return np.array([[cv_rgb2hsv(*map(int, px)) for px in row] for row in x], dtype=np.uint8)

    def rgb_of(x):
        return np.array([[cv_hsv2rgb(*map(int, px)) for px in row] for row in x], dtype=np.uint8)

    if d.brightness is not None:
        img = convert(img, beta=d.brightness)
    if d.contrast_first and d.contrast is not None:
        img = convert(img, alpha=d.contrast)
    if d.saturation is not None:
        hsv = hsv_of(img)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=d.saturation)
        img = rgb_of(hsv)
    if d.hue is not None:
        hsv = hsv_of(img)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + d.hue) % 180
        img = rgb_of(hsv)
    if not d.contrast_first and d.contrast is not None:
        img = convert(img, alpha=d.contrast)
    return img


@pytest.mark.parametrize("draws", [
    PhotometricDraws(brightness=-20.7, contrast_first=True, contrast=1.37, saturation=0.61, hue=-18),
    PhotometricDraws(brightness=31.2, contrast_first=False, contrast=0.55, saturation=1.45, hue=17),
    PhotometricDraws(brightness=None, contrast_first=False, contrast=None, saturation=None, hue=5),
])
def test_photometric_distortion_against_mmseg_oracle(draws):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    img[0, 0], img[0, 1], img[0, 2] = (200, 200, 200), (255, 0, 0), (0, 0, 0)  # grey, saturated, black
    ours = photometric_distortion(torch.from_numpy(img).permute(2, 0, 1), draws).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, mmseg_photometric(img, draws))


def test_photometric_draws_follow_mmseg_ranges():
    draws = [draw_photometric(rng_for(0, i)) for i in range(2000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        rate = np.mean([getattr(d, name) is not None for d in draws])
        assert 0.45 < rate < 0.55, (name, rate)
    assert 0.45 < np.mean([d.contrast_first for d in draws]) < 0.55
    hues = {d.hue for d in draws if d.hue is not None}
    assert hues == set(range(-18, 18))  # numpy randint(-18, 18): the upper bound is excluded
    assert all(-32 <= d.brightness <= 32 for d in draws if d.brightness is not None)
    assert all(0.5 <= d.contrast <= 1.5 for d in draws if d.contrast is not None)


def test_random_scale_is_mmseg_resize_with_ratio_range():
    """ratio x img_scale, int-truncated, then the keep-ratio rescale (hand-computed)."""
    voc = AugmentParams(crop=512, img_scale=(2048, 512), scale=(1.5, 1.5))
    assert random_scale_size(375, 500, voc, rng_for(0, 0)) == (768, 1024)  # factor min(3072/500, 768/375)
    context = AugmentParams(crop=480, img_scale=(520, 520), scale=(0.5, 0.5))
    assert random_scale_size(375, 500, context, rng_for(0, 0)) == (195, 260)  # long side 260
    own = AugmentParams(crop=32, scale=(0.75, 0.75))
    # no img_scale: base (W, H) = (31, 21) -> scale (23, 15) -> factor min(23/31, 15/21) = 15/21
    assert random_scale_size(21, 31, own, rng_for(0, 0)) == (15, 22)


def _mmseg_crop(label: np.ndarray, crop: int, seed: int, ratio: float) -> tuple[int, int]:
    """RandomCrop's box for the same raw draws (offset_h then offset_w per box)."""
    g = rng_for(seed, 0)
    mh, mw = max(label.shape[0] - crop, 0), max(label.shape[1] - crop, 0)
    boxes = [(int(torch.randint(0, mh + 1, (), generator=g)), int(torch.randint(0, mw + 1, (), generator=g)))
             for _ in range(11)]
    for top, left in boxes[:10]:
        values, counts = np.unique(label[top : top + crop, left : left + crop], return_counts=True)
        counts = counts[values != 255]
        if len(counts) > 1 and counts.max() / counts.sum() < ratio:
            return top, left
    return boxes[10]


def test_cat_max_ratio_redraws_until_no_class_dominates():
    """Columns 0-15 class 1, 16-23 class 2, crop 8: only left offsets 11-13 hold <75% of one class."""
    label = np.ones((8, 24), np.int64)
    label[:, 16:] = 2
    label[0, :] = 255  # ignored pixels are not counted
    redrawn = 0
    for seed in range(40):
        box = crop_box(8, 24, 8, rng_for(seed, 0), torch.from_numpy(label), 0.75)
        assert box == _mmseg_crop(label, 8, seed, 0.75)
        redrawn += box != crop_box(8, 24, 8, rng_for(seed, 0))  # the rule off: the first box
    assert redrawn > 10
    single = np.ones((8, 24), np.int64)  # one category everywhere: ten redraws, the last box kept
    for seed in range(5):
        assert crop_box(8, 24, 8, rng_for(seed, 0), torch.from_numpy(single), 0.75) == _mmseg_crop(single, 8, seed, 0.75)


def test_ignore_gt_void_masks_exactly_the_void_pixels(tmp_path):
    ds = build_dataset("synthetic", split="train", num_images=3, ignore_boundary=True)
    params = AugmentParams(crop=48, scale=(0.5, 1.5), cat_max_ratio=0.75)
    crops = TrainCrops(ds, params, seed=5, ignore_gt_void=True)
    for position in range(6):
        sample = ds[crops.index(position)]
        assert (sample.label == 255).any()
        item = crops[position]
        gt = augment(sample.image, np.where(sample.label == 255, 255, 0), params, rng_for(5, position))
        expected = torch.where(gt.valid, gt.label, 255)
        assert torch.equal(item["label"], expected) and torch.equal(item["valid"], gt.valid)
        assert torch.equal(item["image"], gt.image)
    assert "label" not in TrainCrops(ds, params, seed=5)[0]
    Image.fromarray(ds[0].image).save(tmp_path / "a.png")
    unlabelled = build_dataset("images", root=str(tmp_path))
    with pytest.raises(ValueError, match="ignore_gt_void is on but training sample .* has no ground truth"):
        TrainCrops(unlabelled, params, seed=0, ignore_gt_void=True)[0]


def _voc_layout(root, train, val, aug, list_name=None):
    base = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(train + val + aug):
        Image.fromarray(np.full((6, 8, 3), i, np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        if name in train + val:
            Image.fromarray(np.full((6, 8), 1, np.uint8)).save(base / "SegmentationClass" / f"{name}.png")
        Image.fromarray(np.full((6, 8), 2, np.uint8)).save(base / "SegmentationClassAug" / f"{name}.png")
    sets = base / "ImageSets/Segmentation"
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    if list_name:
        (sets / list_name).write_text("\n".join(train + aug) + "\n")
    else:
        (sets / "aug.txt").write_text("\n".join(aug) + "\n")
    return base


@pytest.mark.parametrize("list_name", [None, "trainaug.txt", "train_aug.txt"])
def test_voc_train_aug_split(tmp_path, list_name):
    """mmseg's layouts: train.txt + aug.txt, or one trainaug list; VOC train ids keep SegmentationClass."""
    _voc_layout(tmp_path, ["t1", "t2"], ["v1"], ["s1", "s2", "s3"], list_name)
    ds = build_dataset("voc21", root=str(tmp_path), split="train_aug")
    assert [ds[i].name for i in range(len(ds))] == ["t1", "t2", "s1", "s2", "s3"]
    assert [int(ds[i].label[0, 0]) for i in range(len(ds))] == [1, 1, 2, 2, 2]
    voc20 = build_dataset("voc20", root=str(tmp_path), split="train_aug")
    assert [int(voc20[i].label[0, 0]) for i in range(len(voc20))] == [0, 0, 1, 1, 1]


def test_voc_train_aug_without_lists_names_what_it_needs(tmp_path):
    base = _voc_layout(tmp_path, ["t1"], ["v1"], ["s1"])
    (base / "ImageSets/Segmentation/aug.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_aug.txt.*trainaug.txt.*aug.txt"):
        build_dataset("voc21", root=str(tmp_path), split="train_aug")
