"""maskclip-demo: the Gradio page served in-process and driven by gradio_client (upload, classes,
preset, ζ sliders), its label PNG against Segmenter's on the same input, one weight load per
process, bad input as a message; then the page in headless Chromium (skipped without it)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason='the demo extra is not installed (pip install -e ".[demo]")')
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from chromium_page import browser, chromium_path, not_blank  # noqa: E402, F401  (browser: a fixture)
from maskclip_apro import Segmenter  # noqa: E402
from maskclip_apro.demo import DemoModel, build_app, parse_args  # noqa: E402
from maskclip_apro.samples import sample_paths  # noqa: E402

SMALL = ["generator.short_side=64", "generator.window=64", "generator.stride=32", "refine.apro.iters=3"]
FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cache = tmp_path_factory.mktemp("text_cache")
    overrides = [f"generator.cache_dir={cache}", *SMALL]
    demo = DemoModel("tiny_vit", overrides)
    app = build_app(demo)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True,
                           allowed_paths=[str(demo.out_dir)])
    try:
        yield demo, url, overrides
    finally:
        app.close(verbose=False)


def test_demo_labels_equal_the_segmenter_and_weights_load_once(served, tmp_path):
    demo, url, overrides = served
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    image[:, 32:] = (40, 160, 40)
    Image.fromarray(image).save(tmp_path / "photo.png")
    client = Client(url, verbose=False)
    classes = ["background", "cat, kitten", "grass, lawn"]
    panel, legend, times, label_path, probs_path = client.predict(
        handle_file(str(tmp_path / "photo.png")), "background\ncat, kitten; grass, lawn", "maskclip", "maskclip",
        "apro", 0.2, 0.6, api_name="/segment")
    seg = Segmenter.from_pretrained(model="tiny_vit", vocab=classes, refine="apro", overrides=[
        "protocol=maskclip", "model.dense=maskclip", "refine.apro.zeta_g=0.2", "refine.apro.zeta_s=0.6", *overrides])
    expected = seg(image)
    np.testing.assert_array_equal(np.asarray(Image.open(label_path)), expected.labels)
    probs = load_file(probs_path)["probs"]
    assert probs.shape == tuple(expected.probs.shape)
    np.testing.assert_allclose(probs.astype(np.float32), expected.probs.numpy(), atol=1e-3)
    assert "Legend:" in legend and "grass" in legend and "Seconds per stage" in times and "apro" in times
    assert Image.open(panel).width > 3 * Image.open(panel).height / 2  # image | unary | refined
    # another vocabulary and preset: the same weights, a new generator; the text cache on disk
    client.predict(handle_file(str(tmp_path / "photo.png")), "dog\nsky", "maskclip", "maskclip", "pamr", 0.1, 0.5,
                   api_name="/segment")
    assert demo.weight_loads == 1
    assert any(Path(overrides[0].split("=", 1)[1]).iterdir())


@pytest.mark.parametrize("classes,preset,protocol,message", [
    ("  ", "apro", "maskclip", "empty"),
    ("cat\ncat", "apro", "maskclip", "duplicate"),
    ("cat", "ks", "sclip", "key smoothing"),
])
def test_bad_input_is_a_message_in_the_page(served, classes, preset, protocol, message):
    _, url, _ = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(sample_paths()[1])), classes, "maskclip", protocol, preset, 0.1, 0.5,
                       api_name="/segment")


def test_arguments_are_key_value():
    assert parse_args(["model=tiny_vit", "port=7861", "device=cpu"]) == (
        "tiny_vit", {"host": "127.0.0.1", "port": 7861}, ["device=cpu"])
    with pytest.raises(ValueError, match="key=value"):
        parse_args(["tiny_vit"])
    with pytest.raises(ValueError, match="port"):
        parse_args(["port=abc"])


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_demo_in_a_real_browser(served, browser):
    _, url, _ = served
    browser.resize(1280, 1000)
    text = browser.open(url, wait_for="Seconds per stage", timeout=120)  # the page opens on a result
    time.sleep(1.0)  # let the output fade-in finish before the screenshot
    png = browser.screenshot()
    assert "Legend:" in text and all(name in text for name in ("background", "cat", "grass"))
    assert "Segment" in text and "label PNG" in text
    assert not_blank(png)
    if os.environ.get("MASKCLIP_WRITE_FIGURES"):
        (FIGURES / "demo.png").write_bytes(png)
