"""Hand-made image,caption files whose captions hold unquoted commas read as their author meant."""

import csv
import logging

import pytest

from satcli.core.errors import SatcliError
from satcli.data.datasets import read_dataset
from satcli.data.store import DatasetKind

CAPTIONS = {
    "dog.jpg": ["A dog, brown and white, runs on the grass .", "A dog runs"],
    "cat.png": ['A cat sits on a mat , looking up', 'A "quoted" cat, again'],
    "bird.JPEG": ["a bird"],
}


def _captions(dataset) -> dict[str, list[str]]:
    return {record.path: record.captions for record in dataset.records}


@pytest.mark.parametrize(("kind", "name"), [("flickr8k", "captions.txt"), ("captions-csv", "mine.csv")])
def test_unquoted_commas_read_like_the_properly_quoted_file(tmp_path, caplog, kind, name):
    quoted = tmp_path / "quoted" / name
    quoted.parent.mkdir()
    with quoted.open("w", newline="") as file:  # the reference: what csv.writer makes of the same captions
        csv.writer(file).writerows([("image", "caption"), *((i, c) for i, cs in CAPTIONS.items() for c in cs)])
    loose = tmp_path / "loose" / name
    loose.parent.mkdir()
    loose.write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, cs in CAPTIONS.items() for c in cs))

    expected = _captions(read_dataset(DatasetKind(kind), quoted))
    assert expected["dog.jpg"][0] == CAPTIONS["dog.jpg"][0]
    with caplog.at_level(logging.WARNING, logger="satcli"):
        assert _captions(read_dataset(DatasetKind(kind), loose)) == expected
    assert "3 rows have more than 2 columns (captions with unquoted commas)" in caplog.text
    assert "everything after the first comma as the caption" in caplog.text


def test_rows_that_are_not_image_caption_still_fail_with_their_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("image,caption\ndog.jpg,a dog, running\nnotes about, the data, set\n")
    with pytest.raises(SatcliError, match=r"captions.txt: line 3: expected 2 columns \(image,caption\), got 3"):
        read_dataset(DatasetKind.flickr8k, path)
