"""Reading results needs no torch: the results module and `satcli report` run where torch cannot be imported
(a machine that only reads satcli's Parquet files, a notebook without the 5 GB CUDA wheel)."""

import subprocess
import sys

import numpy as np
from PIL import Image

from satcli.formats.results import CaptionRow
from tests.helpers import peaked_attention, write_results_file

# torch (and models/, which is torch) made unimportable before anything of satcli is imported
BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "


def _results(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [CaptionRow("red.png", "a red square", ["a", "red", "square"], -1.5, True,
                       peaked_attention(3, 2, 2, [(0, 0), (1, 1), (0, 1)]), 64, 48),
            CaptionRow("bad.jpg", error="not-an-image: cannot identify image file")]
    return write_results_file(tmp_path / "captions.parquet", rows)


def test_the_results_module_and_its_attention_helper_import_without_torch(tmp_path):
    results = _results(tmp_path)
    code = BLOCK + (
        "from satcli.formats.results import SCHEMA, read_attention, iter_results; "
        f"rows = list(iter_results({str(results)!r}, SCHEMA.names)); "
        "grids = read_attention(rows[0]); print(grids.shape, round(float(grids.sum()), 3), rows[1]['error'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(3,", "2,", "2)", "3.0", "not-an-image:", "cannot", "identify", "image", "file"]


def test_satcli_report_runs_without_torch(tmp_path):
    results = _results(tmp_path)
    code = BLOCK + (f"sys.argv = ['satcli', 'report', {str(results)!r}, '-o', {str(tmp_path / 'r.html')!r}]; "
                    "from satcli.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    assert "a red square" in page and "not-an-image" in page
    assert np.asarray(Image.open(next((tmp_path / "r_files").glob("*.jpg")))).size > 0
