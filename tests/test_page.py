"""Issue "Safe by default" item 10: the web page, rendered by headless Chromium against a real uvicorn serving
a fake backend (no model): reliability chart with axes, tick labels and per-bin counts; an abstain names its
threshold; a cached answer says so; label contrast of at least 4.5:1."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from tests.server_utils import free_port
from tests.test_safety import FakeBackend, _adapter, _settings

PAGE = Path(__file__).resolve().parents[1] / "server" / "static" / "index.html"


@pytest.fixture
def page_server(tmp_path):
    root = tmp_path / "adapters"
    _adapter(root, "fake")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(_settings(root), FakeBackend()), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    end = time.time() + 60
    while not server.started and time.time() < end:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(30)


def _dom(url: str, tmp_path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian chromium is required (scripts/test.sh installs it)"
    r = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "<svg" in r.stdout, r.stderr[-2000:]
    return r.stdout


def test_page_chart_threshold_and_cache(page_server, tmp_path):
    body = {
        "question": "Which of these is a source of light?",
        "choices": ["the Sun", "the Moon", "a mirror", "a rock"],
        "adapter": "fake",
        "samples": 10,
    }
    first = httpx.post(
        page_server + "/predict", json=body
    ).json()  # the page's own request is then a cache hit
    assert (
        httpx.post(page_server + "/feedback", json={"receipt": first["receipt"], "label": 3}).status_code
        == 200
    )
    dom = _dom(page_server + "/?autosubmit=1", tmp_path)
    svg = re.search(r'<svg id="reliability".*?</svg>', dom, re.S).group(0)  # the drawn chart, not the script
    assert len(re.findall(r'<text class="ytick"', svg)) == 6
    assert re.findall(r'<text class="xtick"[^>]*>([0-9.]+)</text>', svg) == [
        "0.0",
        "0.2",
        "0.4",
        "0.6",
        "0.8",
        "1.0",
    ]
    assert re.findall(r'<text class="count"[^>]*>(\d+)</text>', svg) == [
        "1"
    ]  # one labelled prediction, one bin
    assert ">accuracy</text>" in svg and "confidence (bin)" in svg
    # FakeBackend's answer has confidence 0.644 (logits 0..3), under the adapter's 0.9 threshold
    assert re.search(r"abstain<span id=\"why\"> \(confidence 0\.644 is below the threshold 0\.900\)", dom), (
        dom[-3000:]
    )
    assert 'id="cached"' in dom and "from the cache" in dom
    # the fake adapter stores no calibration reference: the page says so instead of inventing a p-value
    assert re.search(r'id="unfamiliarity">n/a \(no calibration reference\)', dom), dom[-3000:]
    assert "Shift monitor: this adapter stores no calibration reference." in dom


def _luminance(hex_: str) -> float:
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def test_page_text_contrast_is_at_least_4_5():
    colours = dict(re.findall(r"--([a-z-]+): (#[0-9a-f]{6})", PAGE.read_text()))
    pairs = [
        ("text", "bg"),
        ("text-bar", "bg-bar"),
        ("text-bar", "bg-fill"),
        ("text-bar", "bg-fill-top"),
        ("text-abstain", "bg"),
        ("text-answer", "bg"),
        ("text-note", "bg"),
    ]
    for fg, bg in pairs:
        a, b = sorted((_luminance(colours[fg]), _luminance(colours[bg])), reverse=True)
        assert (a + 0.05) / (b + 0.05) >= 4.5, (fg, bg, (a + 0.05) / (b + 0.05))
