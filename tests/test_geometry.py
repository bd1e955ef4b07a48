"""The keep-ratio rescale against hand-computed mmcv cases."""

import pytest

from maskclip_apro.geometry import rescale_size


@pytest.mark.parametrize(
    "size, scale, expected",
    [
        ((375, 500), (2048, 512), (512, 683)),   # VOC: short side 512 (500 * 512 / 375 = 682.67)
        ((500, 375), (2048, 512), (683, 512)),
        ((333, 500), (520, 520), (346, 520)),    # Context: long side 520 (333 * 1.04 = 346.32)
        ((100, 1000), (2048, 512), (205, 2048)),  # long side capped: factor 2.048
        ((512, 512), (2048, 512), (512, 512)),
        ((64, 96), (96, 64), (64, 96)),          # the pair's order does not matter
    ],
)
def test_rescale_size_hand_cases(size, scale, expected):
    assert rescale_size(*size, scale) == expected


@pytest.mark.parametrize("bad", [(512,), (0, 512), (2048.0, 512), "512", None, (True, 512)])
def test_rescale_size_rejects_bad_scale(bad):
    with pytest.raises(ValueError, match="img_scale"):
        rescale_size(100, 100, bad)


def test_dataset_presets_carry_their_test_scale():
    from maskclip_apro.config import compose

    for name, scale in [("voc21", [2048, 512]), ("voc20", [2048, 512]), ("cocostuff171", [2048, 512]),
                        ("context59", [520, 520]), ("context60", [520, 520])]:
        cfg = compose("evaluate", [f"dataset={name}"])
        assert list(cfg.dataset.img_scale) == scale


def test_build_dataset_keeps_and_checks_img_scale():
    from maskclip_apro.data import build_dataset

    assert build_dataset("synthetic", num_images=1).img_scale is None
    assert build_dataset("synthetic", num_images=1, img_scale=[2048, 512]).img_scale == (2048, 512)
    with pytest.raises(ValueError, match="dataset.img_scale"):
        build_dataset("synthetic", num_images=1, img_scale=[512])
