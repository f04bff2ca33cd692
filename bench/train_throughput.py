"""Training throughput, three ways, on the same data, model and batches, in one run:

(a) satcli: encoder features from the on-disk cache, loaded by the training loop's own batch reader in a
    background thread, then the training loop's own optimiser step (``satcli.training.supervised.Stepper``);
(b) the peers' way: every batch's images are normalised and pushed through the frozen encoder again, then the
    same optimiser step (images already decoded in memory, as the tutorials' HDF5 files hold them);
(c) the compute floor: the same optimiser step on feature tensors already in memory — no loading at all.

    python -m bench.train_throughput [--n-train 600] [--steps 20] [--rounds 5] [--write]

The ratio (a)/(c) says how well loading and bookkeeping hide behind compute (target ≥ 0.85); (a)/(b) what
the feature cache buys.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import OtherLoad, command, decoder_stepper, machine, write_section
from models.data import DataConfig, normalise, resize
from satcli.commands.preprocess import run as preprocess
from satcli.core.device import resolve_device
from satcli.data.features import cached_features
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind, StoredDataset
from satcli.training.batches import CaptionTable, batch_plan, feature_batches, prefetch
from satcli.training.distributed import Ranks
from satcli.training.options import TrainOptions


def _seconds(run, first: int, last: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(first, last)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=600, help="shapes training images (5 captions each)")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="the variants take turns this many times")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=args.n_train, n_val=10,
                                     n_test=10))
        dataset = StoredDataset.open(root, "shapes")
        options = TrainOptions(dataset="shapes", data_root=root, encoder="efficientnet-lite0", embed_dim=128,
                               attention_dim=128, decoder_dim=256, dropout=0.2, batch_size=args.batch_size,
                               decoder_lr=2e-3)
        table = CaptionTable.from_store(dataset, "train")
        plan = batch_plan(table.lengths, args.batch_size, seed=0, epoch=0)[: args.steps]
        model, step = decoder_stepper(options, len(dataset.vocab), device)
        features = cached_features(dataset, "train", model, device)

        # (a) satcli: cached features through the training loop's reader, prefetched in a thread
        def cached(first: int, last: int) -> None:
            batches = feature_batches(features, table, plan[first:last], Ranks())
            for f, tokens, lengths, n, n_tokens in prefetch(batches):
                step(f, tokens, lengths, n, n_tokens)

        # (b) the peers: images (decoded, in memory) through the encoder for every batch
        preprocessing = DataConfig.for_config(model.config)
        stored = [b for batch in dataset.iter_batches("train", 256, columns=["image"])
                  for b in batch.column("image").to_pylist()]
        pixels = torch.stack([resize(dataset.decode_image(b), preprocessing) for b in stored])

        def recompute(first: int, last: int) -> None:
            for batch in plan[first:last]:
                lengths = table.lengths[batch]
                tokens = table.tokens[batch, : int(lengths.max()) + 1]
                with torch.no_grad():
                    f = model.encode(normalise(pixels[table.image[batch]], preprocessing).to(device))
                step(f, tokens, lengths, len(batch), int(lengths.sum()))

        # (c) the floor: the same steps on tensors already in memory
        ready = [(torch.from_numpy(np.asarray(features[table.image[b].numpy()], np.float32)).to(device),
                  table.tokens[b, : int(table.lengths[b].max()) + 1].to(device), table.lengths[b].to(device))
                 for b in plan]

        def floor(first: int, last: int) -> None:
            for f, tokens, lengths in ready[first:last]:
                step(f, tokens, lengths, len(f), int(lengths.sum()))

        variants = {"(a) cached features": cached, "(b) encoder in the loop": recompute,
                    "(c) compute floor": floor}
        steppers = {name: decoder_stepper(options, len(dataset.vocab), device)[1] for name in variants}
        n_captions = sum(len(b) for b in plan)
        load = OtherLoad().start()
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, fn in variants.items():
                step = steppers[name]
                took = _seconds(fn, 0, len(plan))
                if round_:
                    seconds[name].append(took)
                    print(f"round {round_} {name}: {n_captions / took:.0f} captions/s", flush=True)
        other_load = load.share()

    rates = {name: n_captions / statistics.median(s) for name, s in seconds.items()}
    turns = list(zip(*seconds.values(), strict=True))  # (a, b, c) seconds of each turn
    ab = statistics.median(b / a for a, b, _ in turns)
    ac = statistics.median(c / a for a, _, c in turns)
    body = "\n".join([
        f"Command: `{command()}`  ",
        f"Machine: {machine()}",
        "",
        f"shapes, {args.n_train} training images, the demo's decoder on the ImageNet head's features"
        f" (efficientnet-lite0, 7×7×1280; decoder 256, attention 128, embedding 128), batch {args.batch_size};"
        f" the same {args.steps} batches for each"
        f" variant, the three taking turns {args.rounds} times (each with its own model and optimiser). Rates are"
        " medians over the turns; the ratios are taken within each turn, then the median, so load from other"
        f" processes hurts a turn rather than a variant. Other processes used {100 * other_load:.0f}% of the"
        " machine's CPU time while it ran (from /proc/stat).",
        "",
        "| variant | captions/s |",
        "|---|---|",
        *(f"| {name} | {rate:.0f} |" for name, rate in rates.items()),
        "",
        f"**(a)/(b) = {ab:.2f}** (the feature cache against re-encoding every batch); "
        f"**(a)/(c) = {ac:.2f}** (target ≥ 0.85: loading hidden behind compute).",
    ])
    print(body)
    if args.write:
        write_section("Training throughput (bench/train_throughput.py)", body)


if __name__ == "__main__":
    main()
