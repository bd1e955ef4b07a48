"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a pipe: load a page,
wait until its text shows something, read its DOM text, take a screenshot. No extra packages: the
protocol's JSON messages go through file descriptors 3 and 4 (--remote-debugging-pipe), NUL-separated."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width: int = 1280, height: int = 1000) -> None:
        self.width = width
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        commands_read, self._write = os.pipe()
        self._read, replies_write = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking",
                 f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write}', chromium_path(), *flags],
            pass_fds=(commands_read, replies_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.resize(width, height)

    def resize(self, width: int, height: int) -> None:
        """The viewport's size in CSS pixels (what a screenshot captures)."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def text(self) -> str:
        """The page's DOM text (document.body.innerText)."""
        result = self.call("Runtime.evaluate", session=True, returnByValue=True,
                           expression="document.body ? document.body.innerText : ''")
        return str(result.get("result", {}).get("value", ""))

    def open(self, url: str, wait_for: str = "", timeout: float = 60.0) -> str:
        """Navigate to url and wait (real time) until the DOM text contains wait_for; the text."""
        self.call("Page.enable", session=True)
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if wait_for in text and text.strip():
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: {wait_for!r} did not appear within {timeout:.0f} s; page text: {text[:500]!r}")
            time.sleep(0.25)

    def screenshot(self, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or the whole page)."""
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, **params)["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def not_blank(png: bytes) -> bool:
    """Whether a screenshot shows something: several distinct colours and a spread of brightness."""
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16 and float(pixels.std()) > 10.0


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for every browser test of the run (import this fixture into a test module)."""
    if chromium_path() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with Browser(1280, 1000) as shared:
        yield shared
