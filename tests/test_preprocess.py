"""``satcli preprocess`` end to end: the shapes default, real-format datasets, and broken or hostile input."""

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from satcli.cli import app
from satcli.commands.preprocess import run
from satcli.core.errors import SatcliError
from satcli.data.preprocess import PreprocessOptions
from satcli.data.shapes.scene import COLOURS, SHAPES
from satcli.data.store import SCHEMA, DatasetKind, StoredDataset
from satcli.data.text import tokenize
from satcli.data.vocab import END_ID, START_ID, UNK_ID
from tests.test_datasets import (
    CAPTIONS,
    SPLIT_OF,
    write_captions_txt,
    write_karpathy,
    write_split_files,
    write_token_file,
)


def write_photos(directory, names, size=(60, 40)):
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (40 * i % 256, 100, 200)).save(directory / name)
    return directory


def test_cli_preprocess_shapes_end_to_end(tmp_path):
    data = tmp_path / "data"
    result = CliRunner().invoke(app, ["preprocess", "--dataset", "shapes", "--n-train", "40", "--n-val", "10",
                                      "--n-test", "10", "--n-heldout", "6", "--data-root", str(data),
                                      "--min-word-freq", "1"])
    assert result.exit_code == 0, result.output
    assert "Preprocessed shapes" in result.output and "vocabulary" in result.output
    assert (data / "shapes" / "source" / "dataset_shapes.json").is_file()

    store = StoredDataset.open(data, "shapes")
    assert [(s, store.n_images(s), store.n_captions(s)) for s in store.splits] == [
        ("train", 40, 200), ("val", 10, 50), ("test", 10, 50), ("heldout", 6, 30)]
    assert pq.read_schema(store.path("train")).equals(SCHEMA)
    assert set(COLOURS) | set(SHAPES) | {"large", "small", "two", "left", "above"} <= set(store.vocab.words)
    assert store.image_size == 256 and store.meta["dataset"] == "shapes" and store.meta["unknown_word_rate"] == 0
    assert store.meta["source"]["format"] == "karpathy-json"

    ids = set()
    for batch in store.iter_batches("val", batch_size=4):
        for row in batch.to_pylist():
            ids.add(row["image_id"])
            assert (row["width"], row["height"]) == (128, 128)
            for caption, token_ids in zip(row["captions"], row["token_ids"], strict=True):
                assert token_ids[0] == START_ID and token_ids[-1] == END_ID
                assert store.vocab.decode(token_ids) == tokenize(caption)
            # The stored picture still matches the boxes after the squash to 256 px.
            pixels = np.asarray(store.decode_image(row["image"]), dtype=float)
            assert pixels.shape == (256, 256, 3)
            for obj in row["objects"]:
                x0, y0, x1, y1 = obj["box"]
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
                colour = obj["label"].split()[1]
                centre = pixels[int((y0 + y1) / 2 * 256), int((x0 + x1) / 2 * 256)]
                assert np.abs(centre - COLOURS[colour]).max() < 50, (obj, centre)
    assert len(ids) == 10


def test_the_three_flickr8k_spellings_make_the_same_store(tmp_path):
    photos = write_photos(tmp_path / "Flicker8k_Dataset", CAPTIONS)
    text = write_split_files(tmp_path / "Flickr8k_text")
    files = {
        "karpathy": write_karpathy(tmp_path / "dataset_flickr8k.json"),
        "token": write_token_file(text / "Flickr8k.token.txt"),
        "kaggle": write_captions_txt(text / "captions.txt"),  # split files beside it: used, as for the token file
    }
    stores = {}
    for name, captions in files.items():
        run(PreprocessOptions(DatasetKind.flickr8k, images=photos, captions=captions, name=name,
                              data_root=tmp_path / "data", min_word_freq=1, image_size=32))
        stores[name] = StoredDataset.open(tmp_path / "data", name)
    tables = {name: {s: store.read(s, ["image_id", "path", "captions", "token_ids"]).to_pylist()
                     for s in store.splits} for name, store in stores.items()}
    assert tables["karpathy"] == tables["token"] == tables["kaggle"]
    assert {s: [r["path"] for r in rows] for s, rows in tables["token"].items()} == {
        s: [p for p, split in SPLIT_OF.items() if split == s] for s in ("train", "val", "test")}
    assert stores["karpathy"].vocab.words == stores["token"].vocab.words == stores["kaggle"].vocab.words
    assert stores["token"].meta["left_out_images"] == {"total": 1, "reasons": {"not in a split file": 1}}


def test_missing_and_broken_images_are_skipped_counted_and_named(tmp_path, caplog):
    names = list(CAPTIONS)
    photos = write_photos(tmp_path / "photos", names[2:], size=(300, 200))
    (photos / names[2]).write_bytes(b"this is not a JPEG")
    (photos / names[3]).write_bytes((photos / names[3]).read_bytes()[:400])  # cut off mid-download
    captions = write_token_file(tmp_path / "Flickr8k.token.txt")
    options = PreprocessOptions(DatasetKind.flickr8k, images=photos, captions=captions, data_root=tmp_path / "data",
                                min_word_freq=1, seed=3)
    with caplog.at_level(logging.WARNING, logger="satcli"):
        result = run(options)
    reasons = {"missing": 2, "not-an-image": 1, "truncated": 1}
    assert result.skipped == reasons
    assert sum(r.n_images for r in result.splits.values()) == 1
    for name in names[:4]:
        assert any(name in message for message in caplog.messages)
    meta = StoredDataset.open(tmp_path / "data", "flickr8k").meta
    assert meta["skipped_images"] == {"total": 4, "reasons": reasons}


def test_a_dataset_with_no_readable_image_is_an_error_and_leaves_no_store(tmp_path):
    photos = (tmp_path / "wrong_folder")
    photos.mkdir()
    captions = write_karpathy(tmp_path / "dataset_flickr8k.json")
    options = PreprocessOptions(DatasetKind.flickr8k, images=photos, captions=captions, data_root=tmp_path / "data")
    with pytest.raises(SatcliError, match=r"wrong_folder: none of the 4 listed images could be read \(4 missing\)"):
        run(options)
    assert list((tmp_path / "data" / "flickr8k").iterdir()) == []


def test_image_paths_cannot_leave_the_images_directory(tmp_path):
    write_photos(tmp_path, ["secret.jpg"])
    photos = write_photos(tmp_path / "photos", ["ok.jpg"])
    captions = tmp_path / "mine.csv"
    captions.write_text("image,caption\nok.jpg,fine\n../secret.jpg,sneaky\n")
    with pytest.raises(SatcliError, match=r"mine.csv: line 3: image path '../secret.jpg' leaves the images directory"):
        run(PreprocessOptions(DatasetKind.captions_csv, images=photos, captions=captions, data_root=tmp_path / "data"))
    with pytest.raises(SatcliError, match="must be a plain directory name"):
        run(PreprocessOptions(DatasetKind.shapes, name="../elsewhere", data_root=tmp_path / "data"))
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "data").exists()


def test_rare_words_long_captions_and_upright_sizes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8  # stored landscape, shown portrait
    for i in range(10):
        Image.new("RGB", (60, 40), "gray").save(photos / f"{i}.jpg", exif=exif.tobytes())
    rows = [f"{i}.jpg,a dog runs on grass {'very ' * 8 if i == 0 else ''}word{i}" for i in range(10)]
    captions = tmp_path / "mine.csv"
    captions.write_text("image,caption,split\n" + "\n".join(
        f"{r},{'test' if i == 9 else 'train'}" for i, r in enumerate(rows)) + "\n")
    result = run(PreprocessOptions(DatasetKind.captions_csv, images=photos, captions=captions, name="mine",
                                   data_root=tmp_path / "data", min_word_freq=2, max_caption_length=8))
    store = StoredDataset.open(tmp_path / "data", "mine")
    assert "dog" in store.vocab and "word3" not in store.vocab  # seen once: unknown
    assert result.n_truncated_captions == 1
    first = next(store.iter_batches("train", batch_size=1)).to_pylist()[0]
    assert len(first["token_ids"][0]) == 8 + 2 and first["captions"][0] == rows[0].split(",")[1]
    assert (first["width"], first["height"]) == (40, 60)
    assert store.meta["splits"]["test"]["unknown_word_rate"] == pytest.approx(1 / 6, abs=1e-5)  # "word9" of 6
    (test_row,) = store.token_ids("test")[0]
    assert test_row[-2] == UNK_ID


def test_cli_wrong_input_is_one_red_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["preprocess", "--dataset", "flickr8k", "--data-root", str(tmp_path)])
    assert result.exit_code == 1
    assert "needs --images DIR" in result.output and "Traceback" not in result.output

    bad = tmp_path / "captions.txt"
    bad.write_text("image,caption\na.jpg,fine\nb.jpg\n")
    result = runner.invoke(app, ["preprocess", "--dataset", "flickr8k", "--images", str(tmp_path),
                                 "--captions", str(bad), "--data-root", str(tmp_path / "data")])
    assert result.exit_code == 1
    assert f"{bad}: line 3: expected 2 columns" in result.output.replace("\n", "")
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == json.dumps(["captions.txt"])
