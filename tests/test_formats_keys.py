"""docs/formats.md documents exactly the columns and metadata keys that satcli writes: a caption results file and an
evaluate predictions file are written for real, and the doc's tables are parsed (never copied into this test)."""

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.captioner import Captioner
from satcli.captioning.options import CaptionOptions
from satcli.commands.caption import run as caption
from satcli.commands.evaluate import run as evaluate
from satcli.commands.merge import MergeOptions
from satcli.commands.merge import run as merge
from satcli.commands.preprocess import run as preprocess
from satcli.data.datasets import DatasetKind
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import StoredDataset
from satcli.formats.checkpoint import save_checkpoint
from satcli.formats.results import read_metadata
from satcli.scoring.evaluate import EvaluateOptions
from tests.helpers import tiny_config

FORMATS = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()


def documented_columns() -> list[str]:
    """The names in the first cell of each row of the column table, in the doc's order."""
    section = FORMATS.split("## Caption results (Parquet)", 1)[1].split("\nA grid cell", 1)[0]
    names = []
    for first_cell in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", section, re.M):
        names += re.findall(r"`(\w+)`", first_cell)
    return names


def documented_metadata() -> dict[str, tuple[set[str], str]]:
    """The key-value metadata table: key → (the files that have it, the description)."""
    section = FORMATS.split("### Key-value metadata", 1)[1].split("\n\n`satcli.formats.results", 1)[0]
    rows = re.findall(r"^\| `(satcli\.\w+)` \| ([\w ,]+) \| (.*) \|$", section, re.M)
    return {key: ({w.strip() for w in files.split(",")}, description) for key, files, description in rows}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """A caption results file (two shards merged, an error row among them) and an evaluate predictions file."""
    root = tmp_path_factory.mktemp("formats")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root / "data", n_train=8, n_val=2, n_test=3,
                                 image_size=64, min_word_freq=1))
    vocab = StoredDataset.open(root / "data", "shapes").vocab
    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(vocab), image_size=64))
    checkpoint = save_checkpoint(root / "tiny.pt", model, vocab)
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "grey.png")
    (root / "broken.jpg").write_bytes(b"no image")
    output = root / "captions.parquet"
    for shard in ((0, 2), (1, 2)):
        caption(CaptionOptions(inputs=(str(root / "grey.png"), str(root / "broken.jpg")), model=checkpoint,
                               output=output, workers=0, root=root, progress=False, shard=shard, n_best=2,
                               max_length=6))
    merge(MergeOptions(output=output))
    result = evaluate(EvaluateOptions(dataset="shapes", model=checkpoint, data_root=root / "data", max_length=6,
                                      n_best=2, out=root / "eval", device="cpu"))
    return {"caption": output, "evaluate": result.beams[0].predictions}


@pytest.mark.parametrize("kind", ["caption", "evaluate"])
def test_the_columns_written_are_the_columns_formats_md_documents(written, kind):
    assert pq.read_schema(written[kind]).names == documented_columns()


@pytest.mark.parametrize("kind", ["caption", "evaluate"])
def test_the_metadata_keys_written_are_the_keys_formats_md_documents(written, kind):
    metadata = read_metadata(written[kind])
    rows = documented_metadata()
    assert set(metadata) == {key for key, (files, _) in rows.items() if kind in files}
    for key in set(metadata) - {"satcli.version", "satcli.schema_version", "satcli.fingerprint"}:
        named = set(re.findall(r"`([A-Za-z_]\w*)`(?!s)", rows[key][1]))  # not "`path`s": the column
        fields = set(metadata[key])
        nested = {k for value in metadata[key].values() if isinstance(value, dict) for k in value}
        missing = fields - named
        assert not missing, f"{key}: formats.md does not name {missing}"
        invented = named - fields - nested
        assert not invented, f"{key}: formats.md names {invented}, which the {kind} file does not have"


def test_caption_and_evaluate_describe_the_same_model_alike(written):
    """One metadata builder: the same checkpoint reads the same in both files (evaluate's lacked preprocessing)."""
    assert read_metadata(written["caption"])["satcli.model"] == read_metadata(written["evaluate"])["satcli.model"]
