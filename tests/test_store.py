"""The preprocessed store: one schema, a reader API, atomic replacement, and streaming with bounded memory."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import satcli.data.preprocess as preprocess
from satcli.core.errors import SatcliError
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import SCHEMA, DatasetKind, StoredDataset, StoredImage, StoredObject, StoreWriter
from satcli.data.vocab import Vocabulary

VOCAB = Vocabulary.build([["a", "dog"], ["a", "cat"]], min_freq=1)


def jpeg(colour, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def row(image_id: int, colour=(200, 10, 10), objects=()) -> StoredImage:
    return StoredImage(image_id, f"img/{image_id}.jpg", 640, 480, jpeg(colour), ["A dog.", "a cat"],
                       [VOCAB.encode(["a", "dog"]), VOCAB.encode(["a", "cat"])], list(objects))


def write_store(root: Path, splits: dict[str, list[StoredImage]], row_group_size: int = 2) -> Path:
    with StoreWriter(root, row_group_size) as writer:
        for split, rows in splits.items():
            for r in rows:
                writer.add(split, r)
        return writer.commit(VOCAB, {"image_size": 32, "name": root.name})


def test_round_trip_through_the_reader_api(tmp_path):
    box = StoredObject((0.25, 0.5, 0.75, 1.0), "large red circle", ["red", "circle"])
    write_store(tmp_path / "toy", {"train": [row(0, objects=[box]), row(1), row(2)], "test": [row(3, (0, 0, 250))]})
    store = StoredDataset.open(tmp_path, "toy")

    assert store.splits == ["train", "test"]
    assert (store.n_images("train"), store.n_captions("train"), store.n_images("test")) == (3, 6, 1)
    assert store.vocab.words == VOCAB.words and store.image_size == 32
    assert store.meta["splits"]["train"]["row_groups"] == 2  # 3 images in groups of 2
    assert pq.read_schema(store.path("train")).equals(SCHEMA)

    batches = list(store.iter_batches("train", batch_size=2))
    assert [b.num_rows for b in batches] == [2, 1]
    first = batches[0].to_pylist()[0]
    assert first["objects"] == [
        {"box": [0.25, 0.5, 0.75, 1.0], "label": "large red circle", "words": ["red", "circle"]}]
    assert (first["path"], first["width"], first["height"]) == ("img/0.jpg", 640, 480)
    assert store.vocab.decode(first["token_ids"][0]) == ["a", "dog"]
    picture = store.decode_image(first["image"])
    assert picture.size == (32, 32) and picture.mode == "RGB"
    assert np.allclose(np.asarray(picture)[16, 16], (200, 10, 10), atol=8)

    text_only = next(store.iter_batches("test", columns=["image_id", "captions"]))
    assert text_only.schema.names == ["image_id", "captions"]
    assert "image" not in store.read("train").column_names
    assert store.captions("train") == [["A dog.", "a cat"]] * 3
    assert store.token_ids("test") == [[VOCAB.encode(["a", "dog"]), VOCAB.encode(["a", "cat"])]]


def test_missing_or_incomplete_stores_say_how_to_make_them(tmp_path):
    with pytest.raises(SatcliError, match=r"flickr8k: no preprocessed dataset 'flickr8k' here; run `satcli preprocess "
                                          r"--dataset flickr8k --images DIR --captions FILE`"):
        StoredDataset.open(tmp_path, "flickr8k")

    root = write_store(tmp_path / "mine", {"train": [row(0)]})
    (root / "meta.json").unlink()  # what a preprocess killed before its last step leaves
    with pytest.raises(SatcliError, match=r"mine: incomplete preprocessed dataset .* --name mine`"):
        StoredDataset.open(tmp_path, "mine")

    root = write_store(tmp_path / "shapes", {"train": [row(0)]})
    (root / "vocab.json").write_text('["dog"]')
    with pytest.raises(SatcliError, match=r"vocab.json: not a satcli vocabulary"):
        StoredDataset.open(tmp_path, "shapes")

    root = write_store(tmp_path / "again", {"train": [row(0)]})
    store = StoredDataset.open(tmp_path, "again")
    with pytest.raises(SatcliError, match=r"has no 'val' split \(it has: train\)"):
        store.n_images("val")
    (root / "train.parquet").write_bytes(b"not parquet")
    with pytest.raises(SatcliError, match=r"train.parquet: unreadable split file"):
        StoredDataset.open(tmp_path, "again")


def test_a_failed_rewrite_leaves_the_previous_store_untouched(tmp_path):
    write_store(tmp_path / "toy", {"train": [row(0), row(1)], "val": [row(2)]})
    (tmp_path / "toy" / ".partial-killed").mkdir()  # a run killed with SIGKILL leaves its temp dir behind
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "toy", row_group_size=1) as writer:
        for i in range(5):
            writer.add("train", row(10 + i))  # row groups already written to the temp dir
        raise RuntimeError("disk full")
    store = StoredDataset.open(tmp_path, "toy")
    assert (store.n_images("train"), store.n_images("val")) == (2, 1)
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [
        "meta.json", "train.parquet", "val.parquet", "vocab.json"]

    write_store(tmp_path / "toy", {"train": [row(7)]})  # a finished rewrite replaces everything, val included
    store = StoredDataset.open(tmp_path, "toy")
    assert store.splits == ["train"] and not (tmp_path / "toy" / "val.parquet").exists()


def _noise_dataset(root: Path, n_images: int, side: int = 48) -> tuple[Path, Path]:
    images = root / "photos"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
        lines.append(f"{i}.jpg,a noisy picture number {i % 5}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return images, root / "pairs.csv"


def test_rows_reach_the_file_in_row_groups_while_images_are_still_being_encoded(tmp_path, monkeypatch):
    images, captions = _noise_dataset(tmp_path, 120)
    sizes_seen: list[int] = []
    encode = preprocess._encode

    def watching_encode(path, options):
        partial = list((tmp_path / "data" / "pairs").glob(".partial-*/train.parquet"))
        sizes_seen.append(partial[0].stat().st_size if partial else 0)
        return encode(path, options)

    monkeypatch.setattr(preprocess, "_encode", watching_encode)
    options = PreprocessOptions(dataset=DatasetKind.captions_csv, images=images, captions=captions, name="pairs",
                                data_root=tmp_path / "data", image_size=32, row_group_size=10, n_workers=1)
    preprocess.preprocess(options)

    n_train = StoredDataset.open(tmp_path / "data", "pairs").n_images("train")
    assert pq.ParquetFile(tmp_path / "data" / "pairs" / "train.parquet").metadata.num_row_groups == -(-n_train // 10)
    growing = [s for s in sizes_seen[: n_train - 10] if s > 0]
    assert len(set(growing)) >= 3, "the split file should grow row group by row group during the run"


MEASURE = textwrap.dedent(r"""
    import json, re, sys, tracemalloc
    from pathlib import Path
    import pyarrow as pa
    from satcli.data.store import DatasetKind
    from satcli.commands.preprocess import run
    from satcli.data.preprocess import PreprocessOptions

    def status(field):  # kB -> bytes; VmHWM is this process's peak resident memory
        return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    root = Path(sys.argv[1])
    try:  # pyarrow imports pandas on its first array when pandas is installed: not the dataset's memory
        import pandas  # noqa: F401
    except ImportError:
        pass
    rss_before = status("VmRSS")
    tracemalloc.start()
    run(PreprocessOptions(dataset=DatasetKind.captions_csv, images=root / "photos", captions=root / "pairs.csv",
                          data_root=root / "data", image_size=128, min_word_freq=1))
    print(json.dumps({"python_peak": tracemalloc.get_traced_memory()[1],
                      "arrow_peak": pa.default_memory_pool().max_memory(),
                      "rss_growth": status("VmHWM") - rss_before}))
""")


@pytest.mark.slow
def test_memory_stays_far_below_the_decoded_size_of_the_dataset(tmp_path):
    n_images, side = 3000, 128
    _noise_dataset(tmp_path, n_images)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                            check=True, timeout=120)
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    decoded = n_images * side * side * 3  # 147 MB of pixels at the stored size
    assert peaks["python_peak"] + peaks["arrow_peak"] < decoded / 5, peaks
    assert peaks["rss_growth"] < decoded / 2, peaks
    store = StoredDataset.open(tmp_path / "data", "captions-csv")  # named after the dataset kind by default
    assert sum(store.n_images(s) for s in store.splits) == n_images
    assert store.meta["splits"]["train"]["row_groups"] == -(-store.n_images("train") // 256)
