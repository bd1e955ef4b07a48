"""report.html (evaluate, compare) and index.html (refine): contents, relative pictures inside the
output folder, the gained / lost images against a per-image IoU computed here, and the page in a
real browser (headless Chromium; skipped with the reason when it is absent)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromium_page import browser, chromium_path, not_blank  # noqa: F401  (browser: a fixture)
from maskclip_apro.cli import compare, evaluate, refine
from maskclip_apro.config import compose
from maskclip_apro.evaluation.report import BAR_WIDTH, index_html, iou_bars_svg

SMALL = ["generator.short_side=64", "generator.window=64", "generator.stride=32", "refine.apro.iters=3"]
FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


def _overrides(tmp_path, *extra):
    return [f"generator.cache_dir={tmp_path / 'text_cache'}", f"output_dir={tmp_path / 'out'}", *SMALL, *extra]


def _image_miou(matrix: np.ndarray) -> float:
    """Mean over classes in ground truth or prediction of TP / (TP + FP + FN), written out here."""
    values = []
    for c in range(matrix.shape[0]):
        tp, fn, fp = matrix[c, c], matrix[c].sum() - matrix[c, c], matrix[:, c].sum() - matrix[c, c]
        if tp + fn + fp > 0:
            values.append(tp / (tp + fn + fp))
    return float(np.mean(values)) if values else math.nan


def _pictures(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', page)


def _files_outside(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if p.is_file() and not {"out", "text_cache", "images"} & set(
        p.relative_to(tmp_path).parts[:1])]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    results = compare.run(compose("compare", _overrides(tmp_path, "model=tiny_vit", "dataset=synthetic", "limit=3",
                                                        "panels=0")))
    return tmp_path, results


def test_compare_report_has_the_table_bars_and_the_images_that_gained_and_lost_most(compared):
    tmp_path, results = compared
    out = tmp_path / "out"
    page = (out / "report.html").read_text(encoding="utf-8")
    methods = list(results["methods"])
    for method in methods:
        assert f"<td>{method.replace('>', '&gt;')}</td>" in page
    assert page.count("<svg") == len(methods)
    assert "<script" not in page
    # gained / lost: the best method against the first, per image, recomputed from the records
    base = methods[0]
    focus = max(methods[1:], key=lambda m: results["methods"][m]["mIoU"])
    delta = {}
    for record in sorted((out / "per_image").glob("*.npz")):
        with np.load(record) as data:
            delta[record.stem] = _image_miou(data[f"cm{methods.index(focus)}"]) - _image_miou(data["cm0"])
    gained = [n for n in sorted(delta, key=delta.get, reverse=True)[:3] if delta[n] > 0]
    lost = [n for n in sorted(delta, key=delta.get)[:3] if delta[n] < 0]
    sections = page.split("<h3>")[1:]
    assert len(sections) == 2 and "gained most" in sections[0] and "lost most" in sections[1]
    assert [Path(src).stem for src in _pictures(sections[0])] == gained
    assert [Path(src).stem for src in _pictures(sections[1])] == lost
    for src in _pictures(page):
        assert not src.startswith(("/", "..")) and (out / src).is_file()
        assert Image.open(out / src).width > 4 * Image.open(out / src).height / 2  # image | truth | two methods
    assert not _files_outside(tmp_path)


def test_evaluate_report_shows_the_best_and_worst_images(tmp_path):
    results = evaluate.run(compose("evaluate", _overrides(tmp_path, "model=tiny_vit", "dataset=synthetic", "limit=3",
                                                           "refine=none")))
    (name,) = results["methods"]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert f"best images of {name}" in page and f"worst images of {name}" in page
    assert page.count("<svg") == 1
    assert all((tmp_path / "out" / src).is_file() for src in _pictures(page))
    assert not _files_outside(tmp_path)


def test_refine_writes_an_index_of_its_overlays(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a b", "c"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    summary = refine.run(compose("refine", _overrides(tmp_path, "model=tiny_vit", f"input={folder}", "vocab=voc21",
                                                     "refine=none")))
    assert [f["name"] for f in summary["failed"]] == ["broken"]
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert _pictures(page) == ["overlays/a%20b.png", "overlays/c.png"]
    assert 'href="labels/a%20b.png"' in page and "panels/" not in page
    assert "aeroplane" in page or "airplane" in page  # the legend names the vocabulary
    assert not _files_outside(tmp_path)


def test_index_links_panels_when_written():
    entries = [{"name": "a", "overlay": "overlays/a.png", "label": "labels/a.png", "panel": "panels/a.png"}]
    page = index_html({"images": 1, "refined": 1, "classes": ["cat"]}, entries, np.zeros((256, 3), np.uint8))
    assert 'href="panels/a.png"' in page and _pictures(page) == ["overlays/a.png"]


def test_iou_bars_leave_out_absent_classes_and_scale_with_iou():
    svg = iou_bars_svg([0.5, float("nan"), 0.25], ["cat", "dog", "grass, lawn"])
    assert ">cat<" in svg and ">dog<" not in svg and ">grass<" in svg
    widths = [float(w) for w in re.findall(r'<rect[^>]* width="([0-9.]+)"', svg)]
    assert widths == [BAR_WIDTH * 0.5, BAR_WIDTH * 0.25]


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_report_in_a_real_browser(compared, browser):
    tmp_path, results = compared
    browser.resize(1280, 1300)
    text = browser.open((tmp_path / "out" / "report.html").as_uri(), wait_for="Per-class IoU")
    png = browser.screenshot()
    assert "mIoU (%)" in text and all(m in text for m in results["methods"])
    assert "gained most" in text
    assert not_blank(png)
    if os.environ.get("MASKCLIP_WRITE_FIGURES"):
        (FIGURES / "report.png").write_bytes(png)
