"""The HTML report in a real headless Chromium (Debian's chromium, driven by Playwright): hovering the peak shows the
JSON's peak_bytes, dragging zooms the axis, double-click resets, the keyboard reaches it, no console errors, and it
reads at 1280 and 390 px. Screenshots are kept under artifacts/ (or $MEMOPT_ARTIFACTS) for CI."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from .helpers import CONFIGS, ROOT, invoke

CHROMIUM = os.environ.get("MEMOPT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("MEMOPT_ARTIFACTS", ROOT / "artifacts"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEMOPT_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open(browser, page_file: Path, width: int = 1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"network request: {r.url}") if not r.url.startswith("file:") else None)
    page.goto(page_file.as_uri())
    return page, errors


def _shown_bytes(text: str) -> int:
    match = re.search(r"([\d,]+) B\b", text)
    assert match, text
    return int(match.group(1).replace(",", ""))


def _ticks(page, k: int = 0) -> list[str]:
    return page.locator(f"#chart-{k} .x-tick").all_text_contents()


def _hover_peak(page, k: int = 0) -> int:
    box = page.locator(f"#peak-marker-{k}").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    return _shown_bytes(page.locator(f"#tip-{k} .total").inner_text())


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    return path


def test_profile_report_hover_zoom_keyboard_and_narrow_screens(browser, tmp_path):
    page_file, doc = tmp_path / "step.html", tmp_path / "step.json"
    result = invoke(["profile", CONFIGS / "tiny.yaml", "--html", page_file, "--json-out", doc])
    assert result.exit_code == 0, result.output
    peak = json.loads(doc.read_text())["runs"][0]["peak_bytes"]
    page, errors = _open(browser, page_file)
    assert _hover_peak(page) == peak
    before = _ticks(page)
    box = page.locator("#chart-0 svg").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.up()
    zoomed = _ticks(page)
    assert zoomed != before and int(zoomed[-1]) - int(zoomed[0]) < int(before[-1]) - int(before[0])
    page.mouse.dblclick(box["x"] + box["width"] * 0.5, y)
    assert _ticks(page) == before
    page.keyboard.press("Escape")
    page.focus("#chart-0")  # keyboard: p jumps to the peak, + zooms around it
    page.keyboard.press("p")
    assert _shown_bytes(page.locator("#readout-0").inner_text()) == peak
    page.keyboard.press("+")
    assert _ticks(page) != before
    page.keyboard.press("0")
    rows = page.locator("section.run table").first.locator("tbody tr")
    assert rows.count() > 0
    _screenshot(page, "report-profile-1280.png")
    page.set_viewport_size({"width": 390, "height": 900})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off a phone's screen
    assert _hover_peak(page) == peak
    _screenshot(page, "report-profile-390.png")
    assert errors == []


def test_compare_report_draws_every_run_on_one_scale(browser, tmp_path):
    page_file, doc = tmp_path / "compare.html", tmp_path / "compare.json"
    result = invoke(["compare", CONFIGS / "tiny.yaml", "-s", "ckpt", "--html", page_file, "--json-out", doc])
    assert result.exit_code == 0, result.output
    peaks = [r["peak_bytes"] for r in json.loads(doc.read_text())["runs"]]
    page, errors = _open(browser, page_file)
    assert page.locator("section.run").count() == 2
    assert [_hover_peak(page, k) for k in range(2)] == peaks
    heights = [page.locator(f"#peak-marker-{k}").bounding_box()["y"] for k in range(2)]
    assert heights[1] > heights[0]  # ckpt peaks lower, on the same scale
    axes = [page.locator(f"#chart-{k} .axis text").all_text_contents()[:5] for k in range(2)]
    assert axes[0] == axes[1]
    _screenshot(page, "report-compare-1280.png")
    assert errors == []
