"""The shapes generator: deterministic, and its captions and boxes tell the truth about its pictures."""

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from satcli.data.datasets import read_dataset
from satcli.data.shapes import ShapesOptions, ensure_generated, generate, render
from satcli.data.shapes.scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, plural
from satcli.data.store import DatasetKind
from satcli.data.text import tokenize

OPTIONS = ShapesOptions(n_train=150, n_val=0, n_test=0, seed=7)
SHAPE_OF = {form: shape for shape, words in SHAPES.items() for word in words for form in (word, plural(word))}
SIZE_OF = {word: size for size, words in SIZES.items() for word in words}
RELATION_WORDS = {"left": ("x", -1), "right": ("x", 1), "above": ("y", -1), "over": ("y", -1),
                  "below": ("y", 1), "under": ("y", 1), "beneath": ("y", 1)}


@pytest.fixture(scope="module")
def rendered():
    return [render(i, OPTIONS) for i in range(OPTIONS.n_images)]


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _mentions(tokens):
    """(colour, shape) pairs in the order a caption names them."""
    return [(tokens[i], SHAPE_OF[tokens[i + 1]]) for i in range(len(tokens) - 1)
            if tokens[i] in COLOURS and tokens[i + 1] in SHAPE_OF]


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    options = ShapesOptions(n_train=6, n_val=2, n_test=2, seed=3)
    first, second = generate(tmp_path / "a", options), generate(tmp_path / "b", options)
    assert first.read_bytes() == second.read_bytes()
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(images) == 10
    for name in images:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()

    other = generate(tmp_path / "c", ShapesOptions(n_train=6, n_val=2, n_test=2, seed=4))
    assert other.read_bytes() != first.read_bytes()
    assert all((tmp_path / "a" / "images" / n).read_bytes() != (tmp_path / "c" / "images" / n).read_bytes()
               for n in images)


def test_every_caption_names_exactly_the_objects_drawn(rendered):
    for _, image in rendered:
        assert len(image.captions) == 5 and len(set(image.captions)) == 5
        colours = {o.colour for o in image.objects}
        shapes = {o.shape for o in image.objects}
        sizes = {o.size for o in image.objects}
        for caption in image.captions:
            tokens = tokenize(caption)
            assert {t for t in tokens if t in COLOURS} == colours, caption
            assert {SHAPE_OF[t] for t in tokens if t in SHAPE_OF} == shapes, caption
            assert {SIZE_OF[t] for t in tokens if t in SIZE_OF} == sizes, caption
            assert set(_mentions(tokens)) == {(o.colour, o.shape) for o in image.objects}, caption


def test_count_words_match_the_objects(rendered):
    for _, image in rendered:
        kinds = Counter((o.shape, o.colour, o.size) for o in image.objects)
        for caption in image.captions:
            tokens = tokenize(caption)
            for word, number in (("two", 2), ("three", 3)):
                if word in tokens:
                    assert number in kinds.values() or number == len(image.objects), caption
            for (shape, colour, size), n in kinds.items():
                if n > 1:  # alike objects are counted, never listed as if there were one
                    said = [tokens[i - 2] for i in range(2, len(tokens) - 1)  # "<count> <size> <colour> <shape>"
                            if (SIZE_OF.get(tokens[i - 1]), tokens[i], SHAPE_OF.get(tokens[i + 1]))
                            == (size, colour, shape)]
                    assert said and all(s == ("two", "three")[n - 2] for s in said), caption
            if len(image.objects) == 1:
                assert not {"two", "three"} & set(tokens)


def test_spatial_words_agree_with_the_boxes(rendered):
    """In two-object pictures, "A <relation> B" must hold between the boxes of A and B."""
    checked = 0
    for _, image in rendered:
        objects = image.objects
        if len(objects) != 2 or objects[0].same_kind(objects[1]):
            continue
        by_name = {(o.colour, o.shape): o for o in objects}
        if len(by_name) != 2:
            continue
        for caption in image.captions:
            tokens = tokenize(caption)
            first, second = (by_name[m] for m in _mentions(tokens))
            (word,) = [t for t in tokens if t in RELATION_WORDS]
            axis, sign = RELATION_WORDS[word]
            index = 0 if axis == "x" else 1
            delta = _centre(first.box)[index] - _centre(second.box)[index]
            assert np.sign(delta) == sign, (caption, first.box, second.box)
            checked += 1
    assert checked > 50


def test_boxes_are_inside_the_image_and_do_not_overlap(rendered):
    size = OPTIONS.image_size
    for _, image in rendered:
        for obj in image.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        for a in image.objects:
            for b in image.objects:
                if a is not b:
                    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def test_pixels_match_the_objects_and_the_background_is_muted(rendered):
    palette = np.array(list(COLOURS.values()), dtype=float)
    names = list(COLOURS)
    for data, image in rendered:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)
        assert pixels.shape == (OPTIONS.image_size, OPTIONS.image_size, 3)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in image.objects:
            cx, cy = (int(round(c)) for c in _centre(obj.box))
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
            distances = np.linalg.norm(palette - patch, axis=1)
            assert names[int(distances.argmin())] == obj.colour and distances.min() < 45, (obj, patch)
            x0, y0, x1, y1 = obj.box
            outside[max(0, int(y0) - 2):int(y1) + 3, max(0, int(x0) - 2):int(x1) + 3] = False
        chroma = pixels.max(axis=2) - pixels.min(axis=2)
        assert np.percentile(chroma[outside], 99) < 80, "background looks like an object colour"


def test_variety_of_shapes_colours_sizes_counts_and_layouts(rendered):
    objects = [o for _, image in rendered for o in image.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {len(image.objects) for _, image in rendered} == {1, 2, 3}
    assert {image.background for _, image in rendered} == set(BACKGROUNDS)
    assert {image.axis for _, image in rendered} == {"row", "column"}
    assert any(len({(o.shape, o.colour, o.size) for o in image.objects}) < len(image.objects) for _, image in rendered)
    slots = {**dict.fromkeys(COLOURS, "C"), **dict.fromkeys(SHAPE_OF, "S"), **dict.fromkeys(SIZE_OF, "Z")}
    templates = {" ".join(slots.get(t, t) for t in tokenize(c)) for _, image in rendered for c in image.captions}
    assert len(templates) >= 40


def test_object_words_are_caption_words_naming_the_object(rendered):
    for _, image in rendered:
        caption_words = {t for c in image.captions for t in tokenize(c)}
        for obj in image.objects:
            assert set(obj.words) <= caption_words
            assert obj.colour in obj.words
            assert {SHAPE_OF[w] for w in obj.words if w in SHAPE_OF} == {obj.shape}
            assert {SIZE_OF[w] for w in obj.words if w in SIZE_OF} == {obj.size}


def test_generated_source_reads_as_karpathy_with_objects(tmp_path):
    options = ShapesOptions(n_train=5, n_val=2, n_test=3, seed=1)
    json_path = ensure_generated(tmp_path / "source", options)
    source = read_dataset(DatasetKind.shapes, json_path)
    assert [r.split for r in source.records] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    doc = json.loads(json_path.read_text())
    for record, entry in zip(source.records, doc["images"], strict=True):
        assert (tmp_path / "source" / record.path).is_file()
        assert record.captions == [s["raw"] for s in entry["sentences"]]
        assert [o.box for o in record.objects] == [tuple(o["box"]) for o in entry["objects"]]
        assert [o.label for o in record.objects] == [f"{o['size']} {o['colour']} {o['shape']}"
                                                     for o in entry["objects"]]


def test_ensure_generated_reuses_a_matching_source_and_redraws_otherwise(tmp_path):
    options = ShapesOptions(n_train=4, n_val=1, n_test=1, seed=2)
    json_path = ensure_generated(tmp_path / "source", options)
    stamp = json_path.stat().st_mtime_ns
    assert ensure_generated(tmp_path / "source", options).stat().st_mtime_ns == stamp

    (tmp_path / "source" / "images" / "000003.jpg").unlink()  # damaged: drawn again
    ensure_generated(tmp_path / "source", options)
    assert (tmp_path / "source" / "images" / "000003.jpg").is_file()

    bigger = ShapesOptions(n_train=6, n_val=1, n_test=1, seed=2)
    doc = json.loads(ensure_generated(tmp_path / "source", bigger).read_text())
    assert len(doc["images"]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no partial directories left
