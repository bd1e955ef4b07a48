"""The refine, evaluate and compare commands end to end with the tiny random-weight models."""

import json

import numpy as np
import pytest
from PIL import Image

from maskclip_apro import Segmenter
from maskclip_apro.cli import compare, evaluate, refine
from maskclip_apro.config import compose

SMALL = ["generator.short_side=64", "generator.window=64", "generator.stride=32", "refine.apro.iters=3"]


def _overrides(tmp_path, *extra):
    return [f"generator.cache_dir={tmp_path / 'text_cache'}", f"output_dir={tmp_path / 'out'}", *SMALL, *extra]


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 56), (64, 48)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_refine_writes_labels_overlays_probs_panels_and_skips_on_rerun(tmp_path, image_folder):
    cfg = compose(
        "refine",
        _overrides(tmp_path, "model=tiny_vit", f"input={image_folder}", "vocab=voc21", "save_probs=true", "panel=true"),
    )
    summary = refine.run(cfg)
    out = tmp_path / "out"
    assert summary["refined"] == 2 and summary["reused"] == 0 and summary["not_reused"] == {"new": 2}
    for name, size in [("img0", (40, 56)), ("img1", (64, 48))]:
        label = Image.open(out / "labels" / f"{name}.png")
        assert label.mode == "P" and label.size == (size[1], size[0])
        assert np.asarray(label).max() < 21
        assert Image.open(out / "overlays" / f"{name}.png").size == (size[1], size[0])
        assert (out / "probs" / f"{name}.safetensors").exists()
        assert (out / "panels" / f"{name}.png").exists()
    assert set(summary["seconds_per_image"]) >= {"generator", "apro"}
    again = refine.run(cfg)
    assert again["refined"] == 0 and again["reused"] == 2 and again["not_reused"] == {}
    assert json.loads((out / "summary.json").read_text())["reused"] == 2


def test_refine_on_the_bundled_samples(tmp_path):
    summary = refine.run(compose("refine", _overrides(tmp_path, "model=tiny_vit")))
    assert summary["refined"] == 4
    assert sorted(p.stem for p in (tmp_path / "out" / "labels").glob("*.png")) == [
        "astronaut", "chelsea", "coffee", "rocket"
    ]


def test_refine_with_the_resnet_runs_key_smoothing(tmp_path):
    summary = refine.run(compose("refine", _overrides(tmp_path, "model=tiny_resnet", "limit=1", "refine=ks_pd")))
    assert summary["refined"] == 1 and "ks" in summary["seconds_per_image"]
    assert summary["protocol"] == "maskclip"
    assert (summary["device"], summary["precision"]) == ("cpu", "fp32")  # device=auto without a GPU


def test_refine_on_a_labelled_dataset_reports_miou(tmp_path):
    cfg = compose("refine", _overrides(tmp_path, "model=tiny_vit", "dataset=synthetic", "limit=2", "refine=lp"))
    summary = refine.run(cfg)
    assert 0.0 <= summary["metrics"]["mIoU"] <= 1.0


def test_compare_table_has_every_method_and_resumes(tmp_path):
    cfg = compose("compare", _overrides(tmp_path, "model=tiny_vit", "dataset=synthetic", "limit=3", "panels=1"))
    results = compare.run(cfg)
    out = tmp_path / "out"
    methods = list(cfg.methods)
    assert list(results["methods"]) == methods
    table = (out / "table.md").read_text()
    for method in methods:
        assert f"| {method} |" in table
    assert len(list((out / "per_image").glob("*.npz"))) == 3
    assert len(list((out / "panels").glob("*.png"))) == 1

    # An interrupted run: one image's record is missing; the rerun computes only that one.
    victim = sorted((out / "per_image").glob("*.npz"))[1]
    victim.unlink()
    again = compare.run(cfg)
    assert again["reused"] == 2
    for method in methods:
        np.testing.assert_allclose(again["methods"][method]["mIoU"], results["methods"][method]["mIoU"])

    # A changed refiner parameter invalidates every record.
    changed = compare.run(compose("compare", _overrides(tmp_path, "model=tiny_vit", "dataset=synthetic", "limit=3",
                                                        "panels=0", "refine.apro.zeta_g=0.3")))
    assert changed["reused"] == 0


def test_evaluate_tags_results_with_the_config(tmp_path):
    cfg = compose("evaluate", _overrides(tmp_path, "model=tiny_vit", "dataset=synthetic", "limit=2", "refine=ks_pd"))
    results = evaluate.run(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["refine"]["steps"] == ["pd", "ks"]
    assert saved["config"]["device"] == "auto" and (saved["device"], saved["precision"]) == ("cpu", "fp32")
    assert list(results["methods"]) == ["refine"] or len(results["methods"]) == 1


def test_three_line_python_api(tmp_path):
    seg = Segmenter.from_pretrained(
        model="tiny_vit", vocab=["cat", "dog", "grass"], refine="apro",
        overrides=[f"generator.cache_dir={tmp_path}", *SMALL],
    )
    pred = seg(Image.fromarray(np.full((50, 70, 3), 120, np.uint8)))
    assert pred.labels.shape == (50, 70) and pred.labels.max() < 3
    assert pred.probs.shape[0] == 3
    assert pred.class_names == ["cat", "dog", "grass"]


def test_compare_with_the_resnet_runs_key_smoothing_and_names_the_protocol(tmp_path):
    results = compare.run(compose("compare", _overrides(tmp_path, "model=tiny_resnet", "dataset=synthetic", "limit=1")))
    assert {"+KS", "+KS+PD", "+APro"} <= set(results["methods"])
    assert results["protocol"] == "maskclip"
    assert "protocol maskclip" in (tmp_path / "out" / "table.md").read_text().splitlines()[0]


def test_non_finite_class_scores_are_a_clear_error():
    from types import SimpleNamespace

    import torch

    out = SimpleNamespace(logits=torch.tensor([[[[0.0]], [[float("nan")]]]]), keys=None, features=None)
    with pytest.raises(ValueError, match="NaN or inf class scores"):
        Segmenter.probabilities(out, torch.zeros(1, 3, 1, 1))


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "refine.py"
    missing = tmp_path / "nowhere"
    done = subprocess.run(
        [sys.executable, str(script), "model=tiny_vit", f"input={missing}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: image folder or file not found: '{missing}' does not exist"
    assert "Traceback" not in done.stderr
