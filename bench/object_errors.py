"""Where a model's captions miss objects: one ``satcli evaluate --objects`` predictions file broken down by how
many objects a picture holds and how large they are.

    python -m bench.object_errors W/runs/default-emoji-seed0/evaluate-emoji-test/predictions-test-beam3.parquet \\
        --data-root W/data --dataset emoji --split test

It prints, per number of objects in the picture, the exact-set rate, how many captions name fewer objects than
are there and how many name one object twice ("a train below a train", mentions as ``--objects`` counts them);
object recall by size (box wider than ``--large`` of the picture) and number; and the commonest one-for-one
confusions (one object missed, one other named in its place). For the captions that name one object twice it
says where the two mentions looked: whether the attention peaks of the first two words naming it fall in the
same object's box, in two objects' boxes, or off every box; and how many training captions name one object
twice, for comparison. Objects present and named are the
predictions' own ``objects_present`` / ``objects_named`` columns, as evaluate counted them; the boxes come from
the stored split.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import command
from satcli.data.store import StoredDataset
from satcli.data.text import tokenize
from satcli.formats.results import read_attention
from satcli.scoring.evaluate import dataset_lexicon
from satcli.scoring.objects import mentions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--split", default="test")
    parser.add_argument("--large", type=float, default=75 / 256,
                        help="box width (share of the picture) of a large object")
    args = parser.parse_args()
    store = StoredDataset.open(args.data_root, args.dataset)
    boxes = {row["path"]: row["objects"] for row in store.read(args.split, ["path", "objects"]).to_pylist()}
    lexicon = dataset_lexicon(store)  # the words evaluate --objects counts as naming each object
    table = pq.read_table(args.predictions)
    rows = table.select(["path", "tokens", "objects_present", "objects_named"]).to_pylist()
    scenes, exact, fewer, recall, total, swaps = Counter(), Counter(), Counter(), Counter(), Counter(), Counter()
    twice, looked = Counter(), Counter()
    for i, row in enumerate(rows):
        present, named = set(row["objects_present"]), set(row["objects_named"])
        n = len(present)
        scenes[n] += 1
        exact[n] += present == named
        fewer[n] += len(named) < n
        said = mentions(row["tokens"] or [], lexicon)
        repeated = [label for label, k in Counter(said).items() if k > 1]
        twice[n] += bool(repeated)
        if repeated and n > 1:
            looked[_where_mentions_looked(row["tokens"], repeated[0], read_attention(table, i), boxes[row["path"]],
                                          lexicon)] += 1
        for obj in boxes[row["path"]]:
            key = ("large" if obj["box"][2] - obj["box"][0] > args.large else "small", n)
            total[key] += 1
            recall[key] += obj["label"] in named
        if len(present - named) == 1 and len(named - present) == 1:
            swaps[(*(present - named), *(named - present))] += 1
    print(f"command: {command()}\n\n| objects | scenes | exact set % | captions naming fewer | naming one twice |\n"
          "|---:|---:|---:|---:|---:|")
    for n in sorted(scenes):
        print(f"| {n} | {scenes[n]} | {100 * exact[n] / scenes[n]:.1f} | {fewer[n]} | {twice[n]} |")
    print("\n| size | objects in the scene | objects | recall % |\n|---|---:|---:|---:|")
    for key in sorted(total):
        print(f"| {key[0]} | {key[1]} | {total[key]} | {100 * recall[key] / total[key]:.1f} |")
    print("\ncommonest confusions (present → named): " +
          ", ".join(f"{a} → {b} ({k})" for (a, b), k in swaps.most_common(8)))
    print("\ncaptions of scenes with several objects that name one twice, where its two mentions' attention peaks "
          "fall: " + ", ".join(f"{where} {k}" for where, k in looked.most_common()))
    if "train" in store.splits:
        captions = [tokenize(c) for cs in store.read("train", ["captions"]).column("captions").to_pylist() for c in cs]
        repeats = sum(len(m) > len(set(m)) for m in (mentions(c, lexicon) for c in captions))
        print(f"training captions that name one object twice: {repeats} of {len(captions)}")


def _where_mentions_looked(tokens: list[str], label: str, attention, objects: list[dict], lexicon) -> str:
    """Where the attention peaks of the first two words naming ``label`` fall: "same object", "two objects"
    or "off a box" (a peak cell's centre inside no box, or only one of the two inside one)."""
    at = [t for t, word in enumerate(tokens) if label in lexicon.get((word.lower(),), ())][:2]
    if len(at) < 2:  # the label was named by a phrase of several words: not located here
        return "off a box"
    inside = []
    for t in at:
        rows, cols = attention[t].shape
        y, x = divmod(int(attention[t].argmax()), cols)
        cx, cy = (x + 0.5) / cols, (y + 0.5) / rows  # boxes are on the 0–1 scale of the picture
        hits = [k for k, obj in enumerate(objects) if obj["box"][0] <= cx <= obj["box"][2]
                and obj["box"][1] <= cy <= obj["box"][3]]
        inside.append(hits[0] if hits else None)
    if None in inside:
        return "off a box"
    return "same object" if inside[0] == inside[1] else "two objects"


if __name__ == "__main__":
    main()
