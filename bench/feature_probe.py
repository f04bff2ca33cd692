"""Do the frozen encoder's features name the objects on their own? A linear multi-label probe per encoder.

For each encoder it reads (or fills) satcli's feature cache of a preprocessed dataset with objects, mean-pools
each picture's cells, standardises the pooled features on the training split, fits one logistic layer per class
(full-batch Adam, 600 steps, bias started at the class prior) on the training split and prints, for the training
and the scored split, how often the thresholded classes are exactly the picture's set, with object precision
and recall:

    python -m bench.feature_probe --data-root W/data --dataset emoji --split test \\
        --encoders efficientnet-lite0-stage6,efficientnet-lite1-stage6,efficientnet-lite0

(W: the folder of ``bench.recognition``.) It says which features carry the objects across appearance before
any decoder is trained; the captioner may still do better, as it attends to cells one at a time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import command, machine
from models.captioner import Captioner, CaptionerConfig
from satcli.data.features import cached_features
from satcli.data.store import StoredDataset


def label_sets(dataset: StoredDataset, split: str) -> list[frozenset[str]]:
    objects = pq.read_table(dataset.path(split), columns=["objects"]).column("objects").to_pylist()
    return [frozenset(o["label"] for o in (row or [])) for row in objects]


def probe(train_x: torch.Tensor, train_y: torch.Tensor, steps: int = 600) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(train_x.shape[1], train_y.shape[1])
    prior = train_y.mean(0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        layer.bias.copy_((prior / (1 - prior)).log())
        layer.weight.mul_(0.1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(layer(train_x), train_y).backward()
        optimizer.step()
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--split", default="test", help="the split scored (the probe trains on train)")
    parser.add_argument("--encoders", default="efficientnet-lite0-stage6")
    args = parser.parse_args()
    dataset = StoredDataset.open(args.data_root, args.dataset)
    splits = ("train", args.split)
    labels = {s: label_sets(dataset, s) for s in splits}
    classes = sorted({c for row in labels["train"] for c in row})
    targets = {s: torch.tensor([[c in row for c in classes] for row in labels[s]]) for s in splits}
    print(f"command: {command()}\nmachine: {machine()}\n")
    print("| encoder | split | exact set | object P | object R |\n|---|---|---:|---:|---:|")
    for encoder in args.encoders.split(","):
        model = Captioner(CaptionerConfig(vocab_size=len(dataset.vocab), encoder=encoder), pretrained_encoder=True)
        pooled = {s: torch.from_numpy(np.asarray(cached_features(dataset, s, model, torch.device("cpu")),
                                                 dtype=np.float32)).mean(1) for s in splits}
        mean, std = pooled["train"].mean(0), pooled["train"].std(0) + 1e-5
        layer = probe((pooled["train"] - mean) / std, targets["train"].float())
        with torch.no_grad():
            for s in splits:
                said, truth = layer((pooled[s] - mean) / std) > 0, targets[s]
                right = (said & truth).sum().item()
                print(f"| {encoder} | {s} | {100 * (said == truth).all(1).float().mean().item():.1f} | "
                      f"{100 * right / max(said.sum().item(), 1):.1f} | {100 * right / truth.sum().item():.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
