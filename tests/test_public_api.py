"""The public API for every refiner preset: Segmenter.from_pretrained, seg(image), seg.refiner with
only the raw image, and the one source of refiner parameters shared by the commands and the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskclip_apro import Segmenter
from maskclip_apro.config import compose
from maskclip_apro.refiners import Guidance, KeySmoothing, PromptDenoising

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "refine").glob("*.yaml"))
NEEDS_KEYS = {"ks", "ks_pd", "ks_apro"}  # key smoothing reads the model's keys, which no image can give
NEEDS_WINDOWS = {"lposs", "lposs_plus"}  # LPOSS reads the harness's window scores (tests/test_lposs.py runs it)


def test_every_preset_is_listed():
    assert {"none", "ks", "pd", "ks_pd", "apro", "apro_official", "gp", "lp", "pamr"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_from_pretrained_and_the_refiner_for_every_preset(tmp_path, preset):
    seg = Segmenter.from_pretrained(model="tiny_vit", vocab=["cat", "dog", "grass"], refine=preset,
                                    overrides=["protocol=maskclip", f"generator.cache_dir={tmp_path}",
                                               "refine.apro.iters=2", "refine.pamr.iters=2"])
    assert isinstance(seg.generator.model, torch.nn.Module)  # the open_clip model it runs
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    if preset in NEEDS_WINDOWS:
        with pytest.raises(ValueError, match="per-window scores"):
            seg(image)
        return
    pred = seg(image)
    assert pred.labels.shape == (40, 56) and 0 <= pred.labels.min() and pred.labels.max() < 3

    probs = torch.softmax(torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(0)), 1)
    image = torch.rand(1, 3, 80, 112, generator=torch.Generator().manual_seed(1))
    if preset in NEEDS_KEYS:
        with pytest.raises(ValueError, match="keys"):
            seg.refiner(probs, Guidance(image=image))
        return
    out = seg.refiner(probs, Guidance(image=image))  # only the raw [0, 1] image: the rest is derived
    assert out.shape[:2] == (1, 3) and bool(torch.isfinite(out).all())


def test_refiners_keep_their_names():
    assert KeySmoothing.__name__ == "KeySmoothing" and PromptDenoising.__name__ == "PromptDenoising"


@pytest.mark.parametrize("overrides", [["refine=apro"], ["refine=apro_official"], ["refine=ks_pd"],
                                       ["refine=apro", "refine.apro.zeta_g=0.2", "refine.apro.mode=gp"]])
def test_the_teacher_reads_the_same_refiner_parameters_as_the_commands(overrides):
    """train.yaml has no copy of its own: cfg.refine of train equals that of refine / evaluate / compare."""
    train = compose("train", overrides).refine
    for command in ("refine", "evaluate", "compare"):
        assert compose(command, overrides).refine == train
