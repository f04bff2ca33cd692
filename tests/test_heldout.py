"""The shapes ``heldout`` split: the same classes and words as train, never drawn like any training image."""

import io
import json

import numpy as np
from PIL import Image

from satcli.data.datasets import read_dataset
from satcli.data.shapes import HELDOUT_SPLIT, ShapesOptions, generate, render
from satcli.data.shapes.scene import COLOURS
from satcli.data.store import DatasetKind

OPTIONS = ShapesOptions(n_train=60, n_val=0, n_test=0, n_heldout=40, seed=5)


def _palette_share(data: bytes, obj) -> float:
    """Share of the object's box whose pixels are its training colour (within 30 per channel)."""
    pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=float)
    x0, y0, x1, y1 = (int(round(v)) for v in obj.box)
    return float((np.abs(pixels[y0 : y1 + 1, x0 : x1 + 1] - COLOURS[obj.colour]).max(-1) < 30).mean())


def test_no_heldout_appearance_occurs_in_train():
    by_split: dict[str, list] = {"train": [], HELDOUT_SPLIT: []}
    for index in range(OPTIONS.n_images):
        data, image = render(index, OPTIONS)
        by_split[OPTIONS.split_of(index)] += [(obj.appearance, _palette_share(data, obj)) for obj in image.objects]
    train_looks = {look for look, _ in by_split["train"]}
    heldout_looks = {look for look, _ in by_split[HELDOUT_SPLIT]}
    assert len(by_split[HELDOUT_SPLIT]) > 40 and not train_looks & heldout_looks
    assert {look.fill for look in heldout_looks} == {"outline", "hatched"}
    # In the pixels: every training object is painted in its colour, no held-out object is.
    assert min(share for _, share in by_split["train"]) > 0.15
    assert max(share for _, share in by_split[HELDOUT_SPLIT]) < 0.05


def test_heldout_images_say_the_same_words_as_train(tmp_path):
    json_path = generate(tmp_path, ShapesOptions(n_train=300, n_val=0, n_test=0, n_heldout=40, seed=5))
    records = read_dataset(DatasetKind.shapes, json_path).records
    words = {split: {w for r in records if r.split == split for c in r.captions for w in c.split()}
             for split in ("train", HELDOUT_SPLIT)}
    assert [r.split for r in records].count(HELDOUT_SPLIT) == 40
    assert words[HELDOUT_SPLIT] <= words["train"]
    entries = json.loads(json_path.read_text())["images"]
    assert all(o["appearance"]["fill"] != "solid" for e in entries if e["split"] == HELDOUT_SPLIT
               for o in e["objects"])


def test_adding_the_heldout_split_leaves_the_other_images_as_they_were():
    before = ShapesOptions(n_train=5, n_val=2, n_test=2, seed=1)
    after = ShapesOptions(n_train=5, n_val=2, n_test=2, n_heldout=3, seed=1)
    assert all(render(i, before)[0] == render(i, after)[0] for i in range(before.n_images))
    assert [after.split_of(i) for i in range(after.n_images)][-4:] == ["test", HELDOUT_SPLIT, HELDOUT_SPLIT,
                                                                     HELDOUT_SPLIT]
