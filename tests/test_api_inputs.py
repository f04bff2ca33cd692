"""The Python API takes what people have: paths, folders, globs, PIL images, numpy arrays, tensors, bytes and any
iterable, lazily for iterables, with a batch size per call and a progress bar, and gives the rows `satcli
caption` gives on the same pictures (the one decode-and-caption path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import satcli
from satcli.captioning.options import CaptionOptions
from satcli.commands.caption import run
from satcli.core.errors import SatcliError
from satcli.formats.results import read_attention
from tests.helpers import picture_sensitive_checkpoint

MAX_LENGTH = 6
BATCH = 4


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SATCLI_MODEL", raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return picture_sensitive_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(BATCH)]


@pytest.fixture(scope="module")
def folder(arrays, tmp_path_factory) -> Path:
    """The arrays as PNG files (lossless: the same pixels), a text file the folder search skips."""
    root = tmp_path_factory.mktemp("pictures")
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(root / f"p{i}.png")
    (root / "notes.txt").write_text("not a picture")
    return root


@pytest.fixture(scope="module")
def cli_rows(folder, checkpoint, tmp_path_factory) -> list[dict]:
    """`satcli caption` on the folder, in path order."""
    output = tmp_path_factory.mktemp("cli") / "captions.parquet"
    run(CaptionOptions(inputs=(str(folder),), model=checkpoint, output=output, root=folder, batch_size=BATCH,
                       max_length=MAX_LENGTH, workers=0, progress=False))
    table = pq.read_table(output)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        row["attention_array"] = read_attention(table, i)
    assert len({r["caption"] for r in rows}) > 1, "the captions must tell the pictures apart"
    return rows


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return satcli.load(checkpoint, device="cpu", batch_size=BATCH)


def _assert_rows(results: list[dict], cli_rows: list[dict], exact: bool = True) -> None:
    assert len(results) == len(cli_rows)
    for result, row in zip(results, cli_rows, strict=True):
        assert result["error"] is None and result["caption"] == row["caption"] and result["words"] == row["tokens"]
        if exact:  # the same batches as the CLI run: the same numbers, bit for bit
            assert result["sum_logprob"] == pytest.approx(row["sum_logprob"], abs=0)
            np.testing.assert_array_equal(result["attention"], row["attention_array"])
            assert result["word_probs"] == [float(np.exp(v)) for v in row["token_logprobs"]]
        else:
            np.testing.assert_allclose(result["attention"], row["attention_array"], rtol=1e-5, atol=1e-6)


def test_paths_folders_and_globs_give_the_cli_rows(captioner, folder, cli_rows):
    paths = [str(folder / f"p{i}.png") for i in range(BATCH)]
    by_paths = captioner.caption(paths, max_length=MAX_LENGTH)
    assert [r["path"] for r in by_paths] == paths  # as given
    _assert_rows(by_paths, cli_rows)
    by_folder = captioner.caption(folder, max_length=MAX_LENGTH)  # one folder: walked as the CLI walks it
    _assert_rows(by_folder, cli_rows)
    _assert_rows(captioner.caption(str(folder / "p*.png"), max_length=MAX_LENGTH), cli_rows)
    _assert_rows(captioner.caption([Path(p) for p in paths], max_length=MAX_LENGTH), cli_rows)


def test_pictures_arrays_tensors_and_bytes_give_the_cli_rows(captioner, arrays, folder, cli_rows):
    pngs = [(folder / f"p{i}.png").read_bytes() for i in range(BATCH)]
    kinds = {
        "PIL images": [Image.open(io.BytesIO(data)) for data in pngs],
        "uint8 arrays": arrays,
        "float arrays in [0, 1]": [a.astype(np.float32) / 255 for a in arrays],
        "one N×H×W×C array": np.stack(arrays),
        "C×H×W uint8 tensors": [torch.from_numpy(a).permute(2, 0, 1) for a in arrays],
        "C×H×W float tensors": [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays],
        "one N×C×H×W tensor": torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2),
        "encoded bytes": pngs,
    }
    for kind, inputs in kinds.items():
        results = captioner.caption(inputs, max_length=MAX_LENGTH)
        assert isinstance(results, list), kind
        assert all(r["path"] is None for r in results), kind  # a picture in memory has no path
        _assert_rows(results, cli_rows)
    single = captioner.caption(arrays[0], max_length=MAX_LENGTH)  # one picture on its own: a list of one
    assert len(single) == 1 and single[0]["caption"] == cli_rows[0]["caption"]


def test_an_iterable_is_captioned_lazily_with_the_batch_size_of_the_call(captioner, arrays, cli_rows):
    pulled = []

    def pictures():
        for i in range(40):
            pulled.append(i)
            yield arrays[i % BATCH]

    results = captioner.caption(pictures(), batch_size=2, max_length=MAX_LENGTH)
    assert not isinstance(results, list) and pulled == []  # nothing is read before the first result is asked for
    first = next(results)
    assert first["caption"] == cli_rows[0]["caption"]
    assert len(pulled) <= 2 * 2  # the batch captioned and the one decoded meanwhile, not all 40
    rest = list(results)
    assert len(rest) == 39 and len(pulled) == 40
    assert [r["caption"] for r in rest[:3]] == [r["caption"] for r in cli_rows[1:]]  # batches of 2, same captions
    _assert_rows([first, *rest[:3]], cli_rows, exact=False)


def test_progress_bar_and_error_rows(captioner, folder, capsys):
    results = captioner.caption([str(folder / "p0.png"), b"not an image", str(folder / "missing.png")],
                                progress=True, max_length=MAX_LENGTH)
    assert results[0]["error"] is None
    assert results[1]["error"].startswith("not-an-image:") and results[1]["caption"] is None
    assert results[2]["error"].startswith("unreadable:") and results[2]["path"] == str(folder / "missing.png")
    assert "captioning: 3/3 images (100%)" in capsys.readouterr().err


def test_what_cannot_be_a_picture_is_one_clear_error(captioner):
    with pytest.raises(SatcliError, match="cannot caption a dict"):
        captioner.caption([{"not": "a picture"}])
    with pytest.raises(SatcliError, match="H×W or H×W×C"):
        captioner.caption(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(SatcliError, match="batch_size"):
        captioner.caption(["a.jpg"], batch_size=0)
