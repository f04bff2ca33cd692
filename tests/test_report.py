"""The HTML report, as a person uses it: headless Chromium (Debian's ``chromium``) driven by Playwright.

``make test`` installs chromium when /usr/bin/chromium is missing and it runs as root with apt-get; without a
chromium these tests are skipped. ``SATCLI_CHROMIUM`` (``make test CHROMIUM=...``) points to another one.
"""

import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from satcli.commands.report import run
from satcli.core.errors import SatcliError
from satcli.formats.results import CaptionRow
from satcli.pictures.overlays import overlay_name
from satcli.pictures.report import ReportOptions
from tests.helpers import peaked_attention, write_results_file

CHROMIUM = os.environ.get("SATCLI_CHROMIUM") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: install chromium, or run make test as root, or make test CHROMIUM=/path")
    # Chromium's own files (~/.pki, fontconfig's cache) go to a home of its own, not the session's (conftest).
    home = tmp_path_factory.mktemp("chromium-home")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, env=env)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 800}, device_scale_factor=1)
    page = context.new_page()
    page.errors, page.urls = [], []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("request", lambda request: page.urls.append(request.url))
    yield page
    context.close()


def _luminance_peak(png: bytes) -> tuple[tuple[int, int], np.ndarray]:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)
    # An element at a fractional position is screenshot with a line of page background (#fafafa): cut it off.
    canvas = ~(rgb == 250).all(axis=2)
    rows, cols = np.flatnonzero(canvas.any(axis=1)), np.flatnonzero(canvas.any(axis=0))
    rgb = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    luminance = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return tuple(int(v) for v in np.unravel_index(np.argmax(luminance), luminance.shape)), rgb


def _in_cell(pixel, cell, grid, size):
    (y, x), (row, col), (gh, gw), (height, width) = pixel, cell, grid, size
    return row * height / gh <= y < (row + 1) * height / gh and col * width / gw <= x < (col + 1) * width / gw


def _open(page, report):
    page.goto(report.as_uri())
    page.wait_for_selector("body[data-ready]", timeout=60_000)


def test_clicking_a_word_shows_its_attention(tmp_path, page):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (280, 200), (25, 25, 25)).save(photos / "dark.png")  # the heat is the brightest thing on it
    cells = [(0, 1), (5, 6), (2, 3), (6, 0)]
    grids = peaked_attention(4, 7, 7, cells)
    rows = [
        CaptionRow("broken.jpg", error="not-an-image: cannot identify image file"),
        CaptionRow("dark.png", "a red circle left", ["a", "red", "circle", "left"], -3.0, True, grids, 280, 200,
                   token_logprobs=[math.log(p) for p in (0.9, 0.83, 0.5, 0.25)]),
        CaptionRow("moved.png", "a <b>bold</b> claim", ["a", "<b>bold</b>", "claim"], -2.5, False,
                   grids[:3], 100, 100),
    ]
    results = write_results_file(tmp_path / "captions.parquet", rows)
    summary = run(ReportOptions(results, image_root=photos, progress=False))
    assert (summary.output, summary.n_rows, summary.n_errors, summary.n_missing_images) == (
        tmp_path / "captions.html", 3, 1, 1)

    _open(page, summary.output)
    assert page.locator(".row").count() == 3
    assert "not-an-image: cannot identify image file" in page.locator(".row").nth(0).locator(".error").inner_text()
    assert page.locator(".row").nth(2).locator(".w").nth(1).inner_text() == "<b>bold</b>"  # text, not markup

    row = page.locator(".row").nth(1)
    canvas = row.locator("canvas")
    plain = canvas.screenshot()
    shots = {}
    for t in (1, 3):
        row.locator(".w").nth(t).click()
        assert canvas.get_attribute("data-word") == str(t)
        look = row.locator(".look").inner_text()
        assert look.startswith(f"“{['a', 'red', 'circle', 'left'][t]}”: probability {['0.83', '0.25'][t // 2]}, ")
        shots[t] = canvas.screenshot()
        peak, rgb = _luminance_peak(shots[t])
        assert canvas.evaluate("c => [c.width, c.height]") == [224, 160]  # 280×200 fitted into the 224 box
        assert rgb.shape[:2] == (160, 224)
        assert _in_cell(peak, cells[t], (7, 7), rgb.shape[:2]), f"word {t}: hottest pixel {peak}, not in {cells[t]}"
    first, second = (_luminance_peak(shots[t])[1] for t in (1, 3))
    assert np.abs(first - second).max() > 100  # two words, two different pictures
    assert np.abs(_luminance_peak(plain)[1] - first).max() > 100  # the heat was drawn over the plain image

    assert row.locator(".w").nth(1).get_attribute("title") == "probability 0.83 given the words before"
    older = page.locator(".row").nth(2)  # no token_logprobs: the word's place and gaze only
    older.locator(".w").nth(1).click()
    assert older.locator(".look").inner_text().startswith("“<b>bold</b>”: word 2 of 3, ")

    page.mouse.move(900, 700)  # leaving the caption keeps the clicked word
    assert canvas.get_attribute("data-word") == "3"
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert page.errors == []
    assert all(url.startswith(("file:", "data:")) for url in page.urls), page.urls  # nothing from the network


def test_twenty_thousand_rows_stay_interactive_and_searchable(tmp_path, page):
    grids = peaked_attention(5, 7, 7, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)])
    colours, shapes = ["red", "green", "blue", "orange"], ["circle", "square", "star", "cross", "heart"]
    rows = []
    for i in range(20_000):
        words = ["a", colours[i % 4], shapes[i % 5], "near", "zebra" if i % 1000 == 7 else "edge"]
        rows.append(CaptionRow(f"img/{i:05d}.jpg", " ".join(words), words, -1.0 - (i % 97) / 10, True, grids, 64, 48))
    results = write_results_file(tmp_path / "big.parquet", rows)
    report = run(ReportOptions(results, output=tmp_path / "out" / "big.html", image_root=tmp_path,
                               progress=False)).output

    _open(page, report)  # the generous bound: ready within 60 s
    assert page.locator("#count").inner_text() == "20,000 images"
    assert page.locator(".row").count() == 50  # one page at a time, not 20,000 rows in the DOM
    assert page.locator("#page").inner_text() == "page 1 of 400"
    page.locator("#next").click()
    assert page.locator(".row .meta").first.inner_text().startswith("img/00050.jpg")

    page.locator("#search").fill("zebra")
    page.wait_for_function("document.getElementById('count').textContent.includes('match')", timeout=30_000)
    assert page.locator("#count").inner_text() == "20 of 20,000 images match"
    captions = page.locator(".row .caption").all_inner_texts()
    assert len(captions) == 20 and all("zebra" in c for c in captions)
    assert page.locator(".row .meta").first.inner_text().startswith("img/00007.jpg")

    page.locator("#search").fill("zebra 00007")  # every word must match, in the caption or the path
    page.wait_for_function("document.getElementById('count').textContent.startsWith('1 of')", timeout=30_000)
    row = page.locator(".row").first
    assert "a orange star near zebra" in row.locator(".caption").inner_text()
    row.locator(".w").nth(4).click()
    assert row.locator("canvas").get_attribute("data-word") == "4"
    assert page.errors == []


def test_report_finds_images_under_the_root_the_file_records(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photos / "red.png")
    rows = [CaptionRow("red.png", "red", ["red"], -1.0, True, peaked_attention(1, 4, 4, [(0, 0)]), 40, 30)]
    results = write_results_file(tmp_path / "r.parquet", rows, {"satcli.images": {"root": str(photos)}})
    monkeypatch.chdir(tmp_path)  # red.png is not in the current directory
    assert run(ReportOptions(results, progress=False)).n_missing_images == 0
    assert run(ReportOptions(results, image_root=tmp_path, progress=False)).n_missing_images == 1  # given wins
    photos.rename(tmp_path / "moved")  # the recorded folder is gone: back to the current directory
    monkeypatch.chdir(tmp_path / "moved")
    assert run(ReportOptions(results, progress=False)).n_missing_images == 0


def test_report_refuses_a_file_that_is_no_results(tmp_path):
    bogus = tmp_path / "notes.parquet"
    bogus.write_text("hello")
    with pytest.raises(SatcliError, match="notes.parquet"):
        run(ReportOptions(bogus, progress=False))
    assert not (tmp_path / "notes.html").exists()


def test_report_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from satcli.cli import app

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "pics" / "red.png")
    rows = [CaptionRow("pics/red.png", "a red thing", ["a", "red", "thing"], -1.0, True,
                       peaked_attention(3, 4, 4, [(0, 0), (1, 1), (2, 2)]), 40, 30)]
    results = write_results_file(tmp_path / "r.parquet", rows)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "r.parquet", "-o", "site/index.html", "--overlays", "ov"])
    assert result.exit_code == 0, result.output
    assert "site/index.html (1 image, 0 errors)" in result.output and "not found" not in result.output
    thumb = Image.open(tmp_path / "site" / "index_files" / f"{overlay_name('pics/red.png')}.jpg")
    assert thumb.size == (40, 30)  # small images are not blown up
    assert len(list((tmp_path / "ov").glob("*.gif"))) == 1

    result = CliRunner().invoke(app, ["report", str(results), "-o", str(results)])
    assert result.exit_code == 1 and "would overwrite the results file" in result.output
