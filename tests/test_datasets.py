"""Readers: every caption format, split handling, and errors that name the file and the entry."""

import csv
import json
from pathlib import Path

import pytest

from satcli.core.errors import SatcliError
from satcli.data.datasets import detect_format, read_dataset, seeded_split
from satcli.data.datasets.records import CaptionFormat, ImageRecord
from satcli.data.store import DatasetKind

# A miniature Flickr8k: five images, five captions each, one of them in no split file (as in the real data).
CAPTIONS = {
    f"{1000 + i}_abc.jpg": [f"A dog number {i} runs , caption {k} ." if k != 2 else f'A "quoted", comma caption {i}'
                            for k in range(5)]
    for i in range(5)
}
SPLIT_OF = {"1000_abc.jpg": "train", "1001_abc.jpg": "train", "1002_abc.jpg": "val", "1003_abc.jpg": "test"}
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}


def write_karpathy(path: Path, captions=CAPTIONS, split_of=SPLIT_OF, filepath=None) -> Path:
    images = [{"filename": name, "imgid": i, "split": split_of[name],
               "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps],
               **({"filepath": filepath} if filepath else {})}
              for i, (name, caps) in enumerate(captions.items()) if name in split_of]
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def write_captions_txt(path: Path, captions=CAPTIONS) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        writer.writerows((name, c) for name, caps in captions.items() for c in caps)
    return path


def write_token_file(path: Path, captions=CAPTIONS) -> Path:
    path.write_text("".join(f"{name}#{k}\t{c}\n" for name, caps in captions.items() for k, c in enumerate(caps)))
    return path


def write_split_files(directory: Path, split_of=SPLIT_OF) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, file in SPLIT_FILES.items():
        (directory / file).write_text("".join(f"{name}\n" for name, s in split_of.items() if s == split))
    return directory


def plain(records: list[ImageRecord]) -> list[tuple]:
    return [(r.image_id, r.path, r.split, r.captions) for r in records]


EXPECTED = [(i, name, SPLIT_OF[name], CAPTIONS[name]) for i, name in enumerate(n for n in CAPTIONS if n in SPLIT_OF)]


# ----------------------------------------------------------------------------------------------------------
# The three Flickr8k spellings


def test_three_flickr8k_spellings_give_the_same_records(tmp_path):
    karpathy = read_dataset(DatasetKind.flickr8k, write_karpathy(tmp_path / "dataset_flickr8k.json"))

    text = tmp_path / "Flickr8k_text"  # the official layout: split files beside the token file, found alone
    write_split_files(text)
    token = read_dataset(DatasetKind.flickr8k, write_token_file(text / "Flickr8k.token.txt"))

    kaggle = tmp_path / "kaggle"  # Kaggle ships captions.txt alone; the split files are given with --splits
    kaggle.mkdir()
    csv_ = read_dataset(DatasetKind.flickr8k, write_captions_txt(kaggle / "captions.txt"), splits_dir=text)

    assert (karpathy.format, token.format, csv_.format) == (
        CaptionFormat.karpathy, CaptionFormat.flickr_token, CaptionFormat.flickr_csv)
    assert plain(karpathy.records) == plain(token.records) == plain(csv_.records) == EXPECTED
    assert token.left_out == csv_.left_out == {"not in a split file": 1}
    assert karpathy.records[0].captions[2] == 'A "quoted", comma caption 0'


def test_flickr_without_split_files_gets_a_reproducible_6000_1000_1000_split(tmp_path):
    captions = {f"{i:04d}.jpg": [f"caption of image {i}"] for i in range(16)}
    path = write_token_file(tmp_path / "Flickr8k.token.txt", captions)
    first = read_dataset(DatasetKind.flickr8k, path, seed=0)
    assert first.split_source.startswith("seeded")
    splits = [r.split for r in first.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (12, 2, 2)
    assert [r.path for r in first.records] == list(captions)  # file order kept, all images kept
    assert plain(read_dataset(DatasetKind.flickr8k, path, seed=0).records) == plain(first.records)
    assert [r.split for r in read_dataset(DatasetKind.flickr8k, path, seed=1).records] != splits


def test_seeded_split_ignores_file_order_and_gives_tiny_sets_a_val_and_test():
    names = [f"{i}.jpg" for i in range(40)]
    assert seeded_split(names, 3, (8, 1, 1)) == seeded_split(names[::-1], 3, (8, 1, 1))
    assert sorted(seeded_split(["a", "b", "c"], 0, (6000, 1000, 1000)).values()) == ["test", "train", "val"]


# ----------------------------------------------------------------------------------------------------------
# COCO, Karpathy details, user CSV/JSONL


def test_coco_annotations_and_coco_karpathy_json(tmp_path):
    annotations = {
        "info": {}, "licenses": [],
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640, "height": 480},
                   {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
                   {"id": 9, "file_name": "COCO_val2014_000000000009.jpg"}],  # no caption: left out
        "annotations": [{"id": 1, "image_id": 7, "caption": "A man riding a horse."},
                        {"id": 2, "image_id": 42, "caption": "Two cats on a sofa"},
                        {"id": 3, "image_id": 7, "caption": "Someone on horseback"}],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(annotations))
    coco = read_dataset(DatasetKind.coco, path)
    assert coco.format is CaptionFormat.coco
    assert [(r.path, r.captions) for r in coco.records] == [
        ("COCO_val2014_000000000042.jpg", ["Two cats on a sofa"]),
        ("COCO_val2014_000000000007.jpg", ["A man riding a horse.", "Someone on horseback"]),
    ]
    assert coco.left_out == {"no captions": 1}

    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "restval",
         "sentences": [{"tokens": ["two", "cats"], "raw": "Two cats."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000007.jpg", "split": "test",
         "sentences": [{"tokens": ["a", "horse"]}]},  # no raw: the tokens are the caption
    ]}))
    records = read_dataset(DatasetKind.coco, karpathy).records
    assert plain(records) == [(0, "val2014/COCO_val2014_000000000042.jpg", "train", ["Two cats."]),
                              (1, "val2014/COCO_val2014_000000000007.jpg", "test", ["a horse"])]


def test_captions_csv_and_jsonl_of_a_users_photos(tmp_path):
    rows = [("holiday/beach.jpg", "Sand and sea"), ("holiday/beach.jpg", "A beach, in summer"),
            ("cat.png", "My cat"), ("dog.jpg", "The dog"), ("tree.jpg", "A tree")]
    csv_path = tmp_path / "mine.csv"
    with csv_path.open("w", newline="") as file:
        csv.writer(file).writerows([("caption", "image"), *((c, i) for i, c in rows)])  # any column order
    jsonl_path = tmp_path / "mine.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"image": i, "caption": c}) for i, c in rows) + "\n\n")

    from_csv = read_dataset(DatasetKind.captions_csv, csv_path, seed=5)
    from_jsonl = read_dataset(DatasetKind.captions_csv, jsonl_path, seed=5)
    assert (from_csv.format, from_jsonl.format) == (CaptionFormat.pairs_csv, CaptionFormat.pairs_jsonl)
    assert plain(from_csv.records) == plain(from_jsonl.records)
    assert [(r.path, r.captions) for r in from_csv.records][0] == ("holiday/beach.jpg",
                                                                  ["Sand and sea", "A beach, in summer"])
    assert {r.split for r in from_csv.records} == {"train", "val", "test"}

    with_splits = tmp_path / "split.jsonl"
    with_splits.write_text('{"image": "a.jpg", "captions": ["one", "two"], "split": "val"}\n'
                           '{"image": "b.jpg", "caption": "three", "split": "restval"}\n')
    records = read_dataset(DatasetKind.captions_csv, with_splits).records
    assert plain(records) == [(0, "a.jpg", "val", ["one", "two"]), (1, "b.jpg", "train", ["three"])]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one error naming the file and the entry


def _karpathy(*images) -> str:
    return json.dumps({"images": list(images)})


GOOD = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a dog"}]}
MALFORMED = [
    ("karpathy", "dataset.json", '{"images": [\n{"filename": "a.jpg",,}]}', "line 2 column 22: not valid JSON"),
    ("karpathy", "dataset.json", _karpathy(GOOD, {"split": "train", "sentences": []}),
     "images[1]: missing field 'filename'"),
    ("karpathy", "dataset.json", _karpathy({**GOOD, "split": "training"}), "images[0]: unknown split 'training'"),
    ("karpathy", "dataset.json", _karpathy({**GOOD, "sentences": [{"raw": "ok"}, {"raw": " . "}]}),
     "images[0].sentences[1]: empty caption"),
    ("karpathy", "dataset.json", _karpathy({**GOOD, "filepath": "../.."}),
     "images[0]: image path '../../a.jpg' leaves"),
    ("flickr8k", "captions.txt", "image,caption\na.jpg,fine\nb.jpg\n", "line 3: expected 2 columns (image,caption)"),
    ("flickr8k", "captions.txt", "image,caption\na.jpg,fine\nb,one,two\n", "line 3: expected 2 columns (image,capt"),
    ("captions-csv", "mine.csv", "image,caption\na.jpg,fine\nb.jpg\n", "line 3: expected 2 columns (image,caption)"),
    ("flickr8k", "captions.txt", "image,caption\na.jpg,fine\n/etc/passwd,x\n", "line 3: image path '/etc/passwd'"),
    ("flickr8k", "captions.txt", "image,caption\na.jpg,\n", "line 2: empty caption"),
    ("flickr8k", "Flickr8k.token.txt", "a.jpg#0\tfine\na.jpg#1 no tab here\n", "line 2: no tab"),
    ("flickr8k", "Flickr8k.token.txt", "a.jpg#0\tfine\na.jpg\tno number\n", "line 2: expected '<file>#<n>'"),
    ("flickr8k", "Flickr8k.token.txt", "a.jpg#0\tfine\n..\\x.jpg#0\tup\n", "line 2: image path"),
    ("coco", "captions_val2014.json",
     json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "ok"},
                                                                              {"image_id": 1}]}),
     "annotations[1]: caption is missing"),
    ("coco", "captions_val2014.json",
     json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}),
     "annotations[0]: image_id 2 is not in images[]"),
    ("captions-csv", "mine.csv", "image,caption,split\na.jpg,ok,train\nb.jpg,ok\n", "line 3: expected 3 columns"),
    ("captions-csv", "mine.csv", "image,caption,split\na.jpg,ok,holdout\n", "line 2: unknown split 'holdout'"),
    ("captions-csv", "mine.csv", "picture,text\na.jpg,ok\n", "line 1: the header must name 'image' and 'caption'"),
    ("captions-csv", "mine.jsonl", '{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": \n',
     "line 2: not valid JSON"),
    ("captions-csv", "mine.jsonl", '{"image": "a.jpg", "caption": "ok"}\n{"caption": "no image"}\n',
     "line 2: missing image file name"),
]


@pytest.mark.parametrize(("kind", "file_name", "content", "message"), MALFORMED,
                         ids=[f"{i}-{k}" for i, (k, *_) in enumerate(MALFORMED)])
def test_malformed_entries_name_the_file_and_the_entry(tmp_path, kind, file_name, content, message):
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(SatcliError) as error:
        read_dataset(DatasetKind(kind), path)
    assert str(error.value).startswith(f"{path}: {message}")


def test_a_file_of_another_kind_is_refused_with_the_right_kind_named(tmp_path):
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(SatcliError, match=r"COCO caption annotation JSON.*use --dataset coco"):
        detect_format(DatasetKind.flickr8k, path)
    token = write_token_file(tmp_path / "Flickr8k.token.txt")
    with pytest.raises(SatcliError, match="use --dataset flickr8k"):
        detect_format(DatasetKind.karpathy, token)
    junk = tmp_path / "notes.txt"
    junk.write_text("just some notes\n")
    with pytest.raises(SatcliError, match=f"{junk}: not a caption file satcli recognises"):
        read_dataset(DatasetKind.flickr30k, junk)


def test_split_files_that_disagree_are_refused(tmp_path):
    directory = write_split_files(tmp_path / "text", {**SPLIT_OF})
    with (directory / SPLIT_FILES["test"]).open("a") as file:
        file.write("1000_abc.jpg\n")  # also in train
    token = write_token_file(directory / "Flickr8k.token.txt")
    with pytest.raises(SatcliError, match=r"Flickr_8k.testImages.txt: line 2: 1000_abc.jpg is also in the train"):
        read_dataset(DatasetKind.flickr8k, token)
    (directory / SPLIT_FILES["val"]).unlink()
    with pytest.raises(SatcliError, match="missing split file Flickr_8k.devImages.txt"):
        read_dataset(DatasetKind.flickr8k, token, splits_dir=directory)
