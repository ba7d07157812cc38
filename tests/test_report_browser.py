"""The HTML report in a real browser: Debian's Chromium, headless, renders the report of a real
``quantize`` and of a ``compile`` of the bundled example model; the DOM it built holds the plots
with their data points, and its screenshot is not blank (the plots' colours are on it).

Skipped only when no ``chromium`` is installed (``apt-get install chromium``). The screenshots
can be kept: ``GRAPHOPT_SCREENSHOT_DIR=DIR pytest tests/test_report_browser.py``; this module
also runs as a script, ``python tests/test_report_browser.py REPORT.html OUT.png [WIDTH HEIGHT]``
(white bottom trimmed),
which is how the figures in docs/img were taken.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]


def chromium(html: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local file with a throw-away profile."""
    assert BROWSER is not None
    with tempfile.TemporaryDirectory(prefix="graphopt-chromium-") as profile:
        return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", *args, html.resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 1400, trim: bool = False) -> Path:
    """A PNG of the page's top ``height`` pixels. Headless Chromium paints about 140 px less
    than ``--window-size`` asks and leaves the rest white, so the window is made that much
    taller; ``trim`` cuts what is white at the bottom (for the figures in docs/img)."""
    r = chromium(html, f"--screenshot={png.resolve()}", f"--window-size={width},{height + 160}")
    assert png.exists(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(png).convert("RGB")
    a = np.asarray(img)
    bottom = height
    if trim:
        rows = np.flatnonzero((a[:height] < 250).any(axis=(1, 2)))
        bottom = int(rows[-1]) + 12 if rows.size else height
    img.crop((0, 0, width, min(bottom, a.shape[0]))).save(png, optimize=True)
    return png


def dump_dom(html: Path) -> str:
    r = chromium(html, "--dump-dom")
    assert r.returncode == 0 and "<svg" in r.stdout, r.stderr[-2000:]
    return r.stdout


def _hex(c: str) -> np.ndarray:
    return np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)])


def check_page(html: Path, png: Path, charts: dict[str, int]) -> None:
    """``charts``: chart id -> the least number of data elements (bars or points) it must hold,
    in the DOM Chromium built; the screenshot must show the page (not one flat colour) and
    the plot colours over a visible area."""
    dom = dump_dom(html)
    svgs = re.findall(r'<svg[^>]*\bid="([^"]+)"[^>]*>(.*?)</svg>', dom, re.DOTALL)
    found = {k: len(re.findall(r'class="(?:bar|point)"', body)) for k, body in svgs}
    for chart, least in charts.items():
        assert found.get(chart, 0) >= least, (chart, found)
    titles = re.findall(r'class="chart-title"[^>]*>([^<]+)<', dom)
    assert len(titles) >= len(charts), titles
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(screenshot(html, png)).convert("RGB"),
                     np.float64)
    assert img.shape[0] > 500 and img.shape[1] > 800
    assert img.std() > 20, "blank screenshot"
    blue = np.abs(img - _hex("#0072B2")).sum(-1) < 40  # the bars (int8 layers, changed passes)
    assert blue.sum() > 2000, f"only {int(blue.sum())} pixels of bar colour"
    dots = np.abs(img - _hex("#D55E00")).sum(-1) < 40  # the 'after' point of the trade-off plots
    assert dots.sum() > 40, f"only {int(dots.sum())} pixels of the 'after' point"


def _keep(png: Path, name: str) -> None:
    d = os.environ.get("GRAPHOPT_SCREENSHOT_DIR")
    if d:
        shutil.copy(png, Path(d) / name)


def _cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", *args], check=False, cwd=tempfile.gettempdir(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(BROWSER is None, reason="no chromium (apt-get install chromium)")
def test_quantize_report_renders_in_chromium(tmp_path: Path, example_path: Path) -> None:
    rep = tmp_path / "q.html"
    _cli("quantize", str(example_path), "-o", str(tmp_path / "q.onnx"), "--calibration",
         str(FIXTURES / "digits_calib.npz"), "--report", str(rep))
    png = tmp_path / "q.png"
    check_page(rep, png, {"layers-sqnr_db": 5, "tradeoff-size-latency": 2, "tradeoff-latency-error": 2,
                          "pass-nodes_after": 3, "pass-seconds": 2})
    _keep(png, "report-quantize-example.png")


@pytest.mark.skipif(BROWSER is None, reason="no chromium (apt-get install chromium)")
def test_compile_report_renders_in_chromium(tmp_path: Path, example_path: Path) -> None:
    pytest.importorskip("tvm")
    rep = tmp_path / "m.html"
    _cli("compile", str(example_path), "--input-shape", "input:1,1,8,8", "-o", str(tmp_path / "m.so"),
         "--report", str(rep))
    png = tmp_path / "m.png"
    # stages: prepare, import + lower, tune, build; or prepare and load, when the session's
    # build cache already holds this build (test_report.py compiles the same model)
    check_page(rep, png, {"tradeoff-size-latency": 2, "tradeoff-latency-error": 2, "pass-seconds": 2, "kernels": 1})
    _keep(png, "report-compile-example.png")


if __name__ == "__main__":  # python tests/test_report_browser.py REPORT.html OUT.png [WIDTH HEIGHT]
    size = [int(x) for x in sys.argv[3:5]] or [1200, 1400]
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2]), *size, trim=True))
