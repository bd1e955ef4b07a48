"""Every dense generator through the public API and the compare, evaluate and refine commands,
under MaskCLIP's protocol and the SCLIP-family harness (tiny random-weight models)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from maskclip_apro import Segmenter
from maskclip_apro.cli import compare, evaluate, refine
from maskclip_apro.config import compose

MODES = ["maskclip", "sclip", "clearclip", "naclip", "proxyclip", "vanilla"]
FAST = ["refine.apro.iters=3", "refine.pamr.iters=2", "panels=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text_cache")


@pytest.mark.parametrize("protocol", ["maskclip", "sclip"])
@pytest.mark.parametrize("mode", MODES)
def test_from_pretrained_with_every_dense_mode(cache, mode, protocol):
    seg = Segmenter.from_pretrained(
        model="tiny_vit", vocab=["cat", "dog", "grass, lawn"], refine="none",
        overrides=[f"model.dense={mode}", f"protocol={protocol}", f"generator.cache_dir={cache}"],
    )
    assert isinstance(seg.generator.model, open_clip.CLIP) and seg.generator.backbone.mode == mode
    x = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(0))
    out = seg.generate(x)
    assert torch.equal(seg.unary(x).logits, out.logits)  # the earlier name stays an alias
    assert out.logits.shape[:2] == (2, 3) and out.features.shape[:2] == (2, 32)
    assert out.logits.shape[-2:] == out.features.shape[-2:] == out.keys.shape[-2:]
    norms = out.features.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # the projected features, before normalisation
    assert (out.pixel_cos is not None) == (protocol == "sclip")
    pred = seg(np.full((50, 70, 3), 90, np.uint8))
    assert pred.labels.shape == (50, 70) and pred.labels.max() < 3


@pytest.mark.parametrize("mode", MODES)
def test_compare_runs_each_generator_under_the_harness(tmp_path, cache, mode):
    cfg = compose("compare", [f"model.dense={mode}", "protocol=sclip", "methods=harness", "model=tiny_vit",
                              "dataset=synthetic", "limit=2", f"generator.cache_dir={cache}",
                              f"output_dir={tmp_path / 'out'}", *FAST])
    results = compare.run(cfg)
    assert list(results["methods"]) == ["plain", "+PAMR", "+APro", "+APro+PAMR"]
    assert results["protocol"] == "sclip" and results["images"] == 2
    for r in results["methods"].values():
        assert 0.0 <= r["mIoU"] <= 1.0 and r["postprocess_seconds_per_image"] > 0
    table = (tmp_path / "out" / "table.md").read_text()
    name = {"maskclip": "MaskCLIP", "vanilla": "CLIP"}.get(mode, results["generator"])
    assert table.startswith(f"{name} generator, protocol sclip")
    assert "| +APro+PAMR |" in table and "postprocess s/img" in table


def test_compare_runs_a_dense_mode_under_maskclips_protocol_with_key_smoothing(tmp_path, cache):
    cfg = compose("compare", ["model.dense=naclip", "model=tiny_vit", "dataset=synthetic", "limit=1",
                              f"generator.cache_dir={cache}", f"output_dir={tmp_path / 'out'}", *FAST])
    results = compare.run(cfg)
    assert results["generator"] == "NACLIP" and {"+KS", "+KS+PD", "+APro"} <= set(results["methods"])


def test_evaluate_and_refine_under_a_harness_protocol(tmp_path, cache):
    common = ["model=tiny_vit", "dataset=synthetic", "limit=2", f"generator.cache_dir={cache}",
              "refine.apro.iters=3", "refine.pamr.iters=2"]
    results = evaluate.run(compose("evaluate", ["protocol=naclip", "model.dense=naclip", "refine=pamr_logits",
                                                *common, f"output_dir={tmp_path / 'eval'}"]))
    assert results["protocol"] == "naclip" and results["methods"]["refine"]["steps"] == ["pamr_logits"]
    summary = refine.run(compose("refine", ["protocol=proxyclip", "model.dense=proxyclip", "refine=apro", *common,
                                            f"output_dir={tmp_path / 'refine'}", "panel=true"]))
    assert summary["refined"] == 2 and 0.0 <= summary["metrics"]["mIoU"] <= 1.0
    assert set(summary["seconds_per_image"]) == {"read", "generator", "apro", "postprocess", "write"}
    assert len(list((tmp_path / "refine" / "labels").glob("*.png"))) == 2
    assert len(list((tmp_path / "refine" / "panels").glob("*.png"))) == 2  # ProxyCLIP, +PAMR, labels: apro


HARNESS = {"maskclip": "sclip", "vanilla": "sclip", "sclip": "sclip", "clearclip": "clearclip", "naclip": "naclip",
           "proxyclip": "proxyclip"}  # the protocol each generator runs under (its own, or SCLIP's for the others)


@pytest.mark.parametrize("mode", MODES)
def test_every_generator_runs_through_evaluate_and_refine(tmp_path, cache, mode):
    common = [f"protocol={HARNESS[mode]}", f"model.dense={mode}", "model=tiny_vit", "dataset=synthetic", "limit=1",
              f"generator.cache_dir={cache}", "refine.apro.iters=2"]
    results = evaluate.run(compose("evaluate", [*common, "refine=apro", f"output_dir={tmp_path / 'eval'}"]))
    assert results["protocol"] == HARNESS[mode] and 0.0 <= results["methods"]["refine"]["mIoU"] <= 1.0
    summary = refine.run(compose("refine", [*common, "refine=none", f"output_dir={tmp_path / 'refine'}"]))
    assert summary["refined"] == 1 and len(list((tmp_path / "refine" / "labels").glob("*.png"))) == 1


def test_a_multirun_over_generators_gives_one_table(tmp_path, cache):
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare.py"
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(script), "-m", "model.dense=maskclip,naclip", "protocol=sclip", "methods=harness",
         "model=tiny_vit", "dataset=synthetic", "limit=1", f"output_dir={out}",
         f"generator.cache_dir={cache}", *FAST],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep_dir,) = list((out / "sweep").iterdir())
    records = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert [r["overrides"]["model.dense"] for r in records] == ["maskclip", "naclip"]
    assert [r["results"]["generator"] for r in records] == ["MaskCLIP", "NACLIP"]
    table = (sweep_dir / "sweep_table.md").read_text()
    assert "| job | model.dense | method | mIoU (%) | pixel acc (%) | generator s/img | refiner s/img |" in table
    rows = [line for line in table.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 8 and sum("| naclip | +APro+PAMR |" in row for row in rows) == 1
