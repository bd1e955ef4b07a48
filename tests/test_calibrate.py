"""scripts/calibrate_apro.py: the unary simulation as documented, and the script end to end (--fast)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("imgviz")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_apro.py"


def load_script():
    spec = importlib.util.spec_from_file_location("calibrate_apro", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulated_unary_pools_the_mask_and_flips_the_stated_fraction():
    cal = load_script()
    label = np.zeros((64, 80), np.int64)
    label[:, 40:] = 7
    label[10:30, 5:21] = 15
    label[0, :] = 255  # ignored pixels do not count
    probs = cal.simulate_unary(label, flip=0.0, sigma=0.0, rng=np.random.default_rng(0))
    assert probs.shape == (1, 21, 4, 5)
    truth = torch.tensor([[np.bincount(label[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].ravel(), minlength=256)[:21].argmax()
                           for c in range(5)] for r in range(4)])
    assert torch.equal(probs[0].argmax(0), truth)
    assert float(probs[0, [1, 2, 3, 4, 5, 6, 8, 9]].max()) == 0.0  # classes absent from the photo get nothing
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 4, 5))
    flipped = cal.simulate_unary(label, flip=0.25, sigma=0.0, rng=np.random.default_rng(1))[0].argmax(0)
    assert int((flipped != truth).sum()) == 5  # round(0.25 * 20) patches, each to another class of the photo
    assert set(flipped.unique().tolist()) <= {0, 7, 15}


def test_fast_calibration_prints_the_table():
    done = subprocess.run([sys.executable, str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split(" | ")[0][2:] for r in rows][:2] == ["unary (no refinement)", "PAMR (dilations 8, 16; 10 iterations)"]
    assert rows[2].startswith("| refine=apro (the defaults): GP ζ_g 0.1 ×2 ‖ LP ζ_s 0.5 ×4 |") and len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("| ").split(" | ")[1:]]
        assert len(cells) == 3 and all(re.fullmatch(r"\d+\.\d+", c) for c in cells)
        assert all(0 <= float(c) <= 100 for c in cells[:2])
    assert "nearly clean" in done.stdout and "35% wrong" in done.stdout


def test_lposs_rows_see_the_unary_as_one_window():
    """The photo is one window; the seeds' argmax is the unary's; the LPOSS steps run on it."""
    from maskclip_apro.refiners import Chain, Guidance

    cal = load_script()
    label = np.zeros((48, 64), np.int64)
    label[:, 32:] = 7
    unary = cal.simulate_unary(label, flip=0.2, sigma=0.5, rng=np.random.default_rng(2))
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    windows = cal.lposs_windows(unary, image, seed=0)
    assert windows.boxes == [(0, 0, 48, 64)] and windows.values.shape[-2:] == unary.shape[-2:]
    seeds = torch.einsum("bnkhw,ck->bnchw", torch.nn.functional.normalize(windows.features, dim=2), windows.text)
    assert torch.equal(seeds[0, 0].argmax(0), unary[0].argmax(0))
    params = {"lposs": {"k": 10, "r": 3}}
    for _, steps in cal.LPOSS_ROWS + cal.PIXEL_ROWS:
        out = Chain.from_steps(steps, params)(unary, Guidance(image=image, windows=windows))
        assert out.shape[:2] == unary.shape[:2] and bool(torch.isfinite(out).all())
    base = {"apro": {"zeta_g": 0.1, "gp_scale": 2, "zeta_s": 0.5, "lp_scale": 4}}
    assert [r[0] for r in cal.rows(False, base, lposs=True)][-4:] == [r[0] for r in cal.PIXEL_ROWS + cal.LPOSS_ROWS]
