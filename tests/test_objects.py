"""``evaluate --objects``: which objects a caption names, against the objects present (CHAIR, Rohrbach et al. 2018),
and COCO instance annotations as objects."""

import json

import pytest
from PIL import Image

from satcli.commands.preprocess import run as preprocess
from satcli.core.errors import SatcliError
from satcli.data.instances import category_words, read_coco_instances
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind, StoredDataset
from satcli.data.text import tokenize
from satcli.scoring.objects import build_lexicon, mentions, object_scores

LRC, SBS, LRS, SBC = "large red circle", "small blue square", "large red square", "small blue circle"


def obj(label: str, words: str) -> dict:
    return {"label": label, "words": words.split()}


# Two images' objects, as the shapes dataset stores them: the words its captions used for each object.
LEXICON = build_lexicon([
    [obj(LRC, "large big red circle disc"), obj(SBS, "small little blue square block")],
    [obj(LRS, "large red square squares"), obj(SBC, "small blue circle discs")],
])


def test_mentions_follow_synonyms_plurals_and_leave_incomplete_ones_out():
    assert mentions(tokenize("a big red disc to the left of a little blue block"), LEXICON) == [LRC, SBS]
    assert mentions(tokenize("two large red squares"), LEXICON) == [LRS]
    # "small blue" fits a square and a circle alike: it names neither.
    assert mentions(tokenize("a large red circle and a small blue"), LEXICON) == [LRC]
    assert mentions(tokenize("a picture on a striped background"), LEXICON) == []


def test_object_metrics_on_hand_made_captions():
    present = [LRC, SBS]
    scores = object_scores([
        (tokenize("a big red disc to the left of a little blue block"), present),  # exact, through synonyms
        (tokenize("a large red square above a small blue square"), present),  # one hallucinated object
        (tokenize("a large red circle and a small blue"), present),  # the square is missed
        (tokenize("two large red squares"), [LRS, LRS]),  # a plural, exact
    ], LEXICON)
    # Named sets {LRC,SBS}, {LRS,SBS}, {LRC}, {LRS}: 5 of the 6 named are present, 5 of the 7 present named;
    # 2 of 4 captions name exactly what is there; 1 of 6 mentions and 1 of 4 captions hallucinate.
    assert scores.precision == pytest.approx(5 / 6) and scores.recall == pytest.approx(5 / 7)
    assert scores.exact_set == pytest.approx(2 / 4)
    assert scores.chair_i == pytest.approx(1 / 6) and scores.chair_s == pytest.approx(1 / 4)
    assert (scores.n_images, scores.n_mentions, scores.n_hallucinated) == (4, 6, 1)


def test_chair_i_counts_every_mention_chair_s_every_caption():
    scores = object_scores([(tokenize("a large red square and a large red square and a big red disc"), [LRC])],
                           LEXICON)
    assert (scores.n_mentions, scores.n_hallucinated) == (3, 2)
    assert scores.chair_i == pytest.approx(2 / 3) and scores.chair_s == 1.0
    assert scores.precision == pytest.approx(1 / 2) and scores.recall == 1.0 and scores.exact_set == 0.0


def test_coco_words_phrases_and_plurals():
    lexicon = build_lexicon([[{"label": name, "words": category_words(name)}
                              for name in ("dog", "hot dog", "person", "bus", "knife")]])
    assert mentions(tokenize("a dog eating a hot dog"), lexicon) == ["dog", "hot dog"]
    assert mentions(tokenize("two puppies, three men and some women on buses with knives"), lexicon) == [
        "dog", "person", "person", "bus", "knife"]


INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg", "width": 60, "height": 40},
               {"id": 2, "file_name": "COCO_val2014_000000000002.jpg", "width": 60, "height": 40}],
    "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 58, "name": "hot dog"}],
    "annotations": [{"id": 7, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 15]},
                    {"id": 8, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30.5, 40]},
                    {"id": 9, "image_id": 2, "category_id": 58, "bbox": [1, 2, 3, 4]}],
}


def test_coco_instance_reader(tmp_path):
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(INSTANCES))
    objects = read_coco_instances(path)
    first = objects["COCO_val2014_000000000001.jpg"]
    assert [(o.label, o.box) for o in first] == [("dog", (10, 5, 30, 20)), ("person", (0, 0, 30.5, 40))]
    assert {"dog", "dogs", "puppy", "puppies"} <= set(first[0].words)
    assert {"man", "men", "woman", "women", "people"} <= set(first[1].words)
    assert [(o.label, o.words) for o in objects["COCO_val2014_000000000002.jpg"]] == [
        ("hot dog", ["hot dog", "hot dogs"])]

    broken = json.loads(json.dumps(INSTANCES))
    broken["annotations"][2]["category_id"] = 99
    path.write_text(json.dumps(broken))
    with pytest.raises(SatcliError, match=r"annotations\[2\]: category_id 99"):
        read_coco_instances(path)


def test_preprocess_coco_with_instances_stores_the_objects(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for image in INSTANCES["images"]:
        Image.new("RGB", (60, 40), (90, 120, 150)).save(images / image["file_name"])
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"images": INSTANCES["images"], "annotations": [
        {"id": 1, "image_id": 1, "caption": "A man with a dog."},
        {"id": 2, "image_id": 2, "caption": "A hot dog on a plate."}]}))
    instances = tmp_path / "instances_val2014.json"
    instances.write_text(json.dumps(INSTANCES))
    preprocess(PreprocessOptions(dataset=DatasetKind.coco, images=images, captions=captions, instances=instances,
                                 data_root=tmp_path / "data", min_word_freq=1))
    store = StoredDataset.open(tmp_path / "data", "coco")
    rows = {p: o for s in store.splits for p, o in zip(*store.read(s, ["path", "objects"]).to_pydict().values(),
                                                        strict=True)}
    dog = next(o for o in rows["COCO_val2014_000000000001.jpg"] if o["label"] == "dog")
    assert dog["box"] == pytest.approx([10 / 60, 5 / 40, 30 / 60, 20 / 40]) and "puppies" in dog["words"]
    assert [o["label"] for o in rows["COCO_val2014_000000000002.jpg"]] == ["hot dog"]


def test_instances_of_other_images_are_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "other.jpg")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": [{"id": 5, "file_name": "other.jpg"}],
                                    "annotations": [{"id": 1, "image_id": 5, "caption": "a thing"}]}))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(INSTANCES))
    with pytest.raises(SatcliError, match="none of the 1 images"):
        preprocess(PreprocessOptions(dataset=DatasetKind.coco, images=images, captions=captions,
                                     instances=instances, data_root=tmp_path / "data", min_word_freq=1))


def test_cli_evaluate_objects_prints_and_reports_them(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import torch
    from typer.testing import CliRunner

    from models.captioner import Captioner
    from satcli.cli import app
    from satcli.formats.checkpoint import save_checkpoint
    from tests.helpers import tiny_config

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    data = tmp_path / "data"
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=data, n_train=12, n_val=2, n_test=2,
                                 n_heldout=4, image_size=64, min_word_freq=1))
    store = StoredDataset.open(data, "shapes")
    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(store.vocab), image_size=64), pretrained_encoder=True)
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model, store.vocab)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "shapes", "--data-root", str(data), "--model",
                                      str(checkpoint), "--split", "heldout", "--objects", "--max-length", "8",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for row in ("object precision", "object recall", "exact object set", "CHAIR-i", "CHAIR-s"):
        assert row in result.output
    reported = json.loads((out / "report.json").read_text())["results"][0]["objects"]
    captions = pq.read_table(out / "predictions-heldout-beam3.parquet").to_pydict()
    present = dict(zip(*store.read("heldout", ["path", "objects"]).to_pydict().values(), strict=True))
    lexicon = build_lexicon(store.read(s, ["objects"]).column("objects").to_pylist()[i]
                            for s in store.splits for i in range(store.n_images(s)))
    expected = object_scores(((words, [o["label"] for o in present[path]])
                              for path, words in zip(captions["path"], captions["tokens"], strict=True)), lexicon)
    assert reported == expected.to_dict() and reported["n_images"] == 4


def test_every_reference_caption_of_the_shapes_dataset_names_exactly_its_objects():
    from satcli.data.shapes import ShapesOptions, render

    options = ShapesOptions(n_train=150, n_val=0, n_test=0, n_heldout=30, seed=11)
    images = [render(i, options)[1] for i in range(options.n_images)]
    entries = [[{"label": o.label, "words": o.words} for o in image.objects] for image in images]
    lexicon = build_lexicon(entries)
    scores = object_scores(((tokenize(caption), [o.label for o in image.objects])
                            for image in images for caption in image.captions), lexicon)
    assert scores.n_images == 5 * options.n_images
    assert (scores.precision, scores.recall, scores.exact_set, scores.chair_i, scores.chair_s) == (1, 1, 1, 0, 0)


def test_the_demo_prints_object_metrics_on_test_and_heldout(tmp_path, monkeypatch):
    from satcli.commands.demo import DemoOptions
    from satcli.commands.demo import run as demo
    from satcli.core.console import console

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    with console.capture() as captured:
        result = demo(DemoOptions(data_root=tmp_path / "data", out=tmp_path / "run", epochs=1, n_train=12, n_val=2,
                                  n_test=2, n_heldout=3))
        for renderable in result.renderables():  # what `satcli demo` prints
            console.print(renderable)
    printed = captured.get()
    assert "objects named" in printed and "exact set" in printed and "CHAIR-i" in printed
    assert "heldout (unseen look)" in printed
    for scores in (result.scores, result.heldout):
        assert {"objects_precision", "objects_recall", "objects_exact_set", "objects_chair_i",
                "objects_chair_s"} <= scores.keys()
    assert result.heldout["objects_n_images"] == 3
