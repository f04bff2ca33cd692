"""What cutting EfficientNet-Lite0 before its head changes, in one run: the ImageNet head's features
(``efficientnet-lite0``, 7×7×1280) against the default ``efficientnet-lite0-stage6`` (7×7×192).

    python -m bench.encoder_cut [--images 64] [--steps 20] [--rounds 3] [--write]

Three measurements per encoder, the two encoders taking turns in every round (best turn kept for the encoder,
median for training), so load from other processes hurts a turn rather than an encoder:

- images/s through the frozen encoder (what building the feature cache and ``satcli caption`` pay per image);
- captions/s of the training loop's own optimiser step (``satcli.training.supervised.Stepper``) on feature
  tensors already in memory, with the demo's decoder (embedding 128, attention 128, LSTM 256) and batch 64;
- bytes per image in the feature cache (float16, ``satcli.data.features.cache_bytes``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import OtherLoad, command, decoder_stepper, machine, write_section
from models.encoders import ENCODERS, Encoder
from satcli.data.features import cache_bytes
from satcli.training.options import TrainOptions
from satcli.training.supervised import Stepper

ENCODER_NAMES = ("efficientnet-lite0", "efficientnet-lite0-stage6")
N_WORDS = 66  # the shapes vocabulary
CAPTION_TOKENS = 12  # <start>, ten words, <end>: a typical shapes caption


def _encode_rate(encoder: Encoder, images: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        encoder(images)
    return len(images) / (time.perf_counter() - start)


def _train_rate(step: Stepper, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for features, tokens, lengths in batches:
        step(features, tokens, lengths, len(features), int(lengths.sum()))
    return sum(len(f) for f, _, _ in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="random 224 px images through each encoder")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per encoder and round")
    parser.add_argument("--rounds", type=int, default=3, help="the encoders take turns this many times")
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args()
    print(f"$ {command()}\n{machine()}", flush=True)

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, 224, 224, generator=generator) * 2 - 1
    tokens = torch.randint(3, N_WORDS, (args.steps, 64, CAPTION_TOKENS), generator=generator)
    lengths = torch.full((64,), CAPTION_TOKENS - 1)  # words + <end>, as the training tables count them
    encoders = {name: Encoder(name, pretrained=True).eval() for name in ENCODER_NAMES}
    batches = {}
    for name in ENCODER_NAMES:
        rows, cols = encoders[name].grid_shape(224, 224)
        features = torch.randn(args.steps, 64, rows * cols, ENCODERS[name].dim, generator=generator)
        batches[name] = [(features[i], tokens[i], lengths) for i in range(args.steps)]
    steppers = {name: decoder_stepper(TrainOptions(dataset="shapes", encoder=name, embed_dim=128, attention_dim=128,
                                                   decoder_dim=256, dropout=0.5, decoder_lr=2e-3),
                                      N_WORDS, torch.device("cpu"))[1] for name in ENCODER_NAMES}

    encode: dict[str, list[float]] = {name: [] for name in ENCODER_NAMES}
    train: dict[str, list[float]] = {name: [] for name in ENCODER_NAMES}
    load = OtherLoad().start()
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in ENCODER_NAMES:
            rates = _encode_rate(encoders[name], images), _train_rate(steppers[name], batches[name])
            if round_:
                encode[name].append(rates[0])
                train[name].append(rates[1])
                print(f"round {round_} {name}: {rates[0]:.1f} images/s, {rates[1]:.0f} captions/s", flush=True)
    other_load = load.share()

    head, cut = ENCODER_NAMES
    rows = []
    for name in ENCODER_NAMES:
        grid = encoders[name].grid_shape(224, 224)
        rows.append(f"| `{name}` | {grid[0]}×{grid[1]}×{ENCODERS[name].dim} | {max(encode[name]):.1f} | "
                    f"{statistics.median(train[name]):.0f} | {cache_bytes(1, grid, ENCODERS[name].dim) / 1e3:.1f} kB |")
    train_ratio = statistics.median(c / h for h, c in zip(train[head], train[cut], strict=True))
    encode_ratio = max(encode[cut]) / max(encode[head])
    body = "\n".join([
        f"Command: `{command()}`  ",
        f"Machine: {machine()}",
        "",
        f"{args.images} random 224 px images through each frozen encoder (pretrained weights; best of {args.rounds}"
        f" turns); {args.steps} training steps of batch 64 on feature tensors in memory (random features of each"
        f" encoder's shape, the same random captions of {CAPTION_TOKENS - 2} words; the demo's decoder;"
        f" median of {args.rounds} turns, the ratio taken within each turn). Other processes used"
        f" {100 * other_load:.0f}% of the machine's CPU time while it ran (from /proc/stat).",
        "",
        "| encoder | features | encoder images/s | training captions/s | cache per image |",
        "|---|---|---:|---:|---:|",
        *rows,
        "",
        f"**Cut / head: encoder {encode_ratio:.2f}×, training {train_ratio:.2f}×, cache "
        f"{ENCODERS[head].dim / ENCODERS[cut].dim:.2f}× smaller.** The cut skips the seventh stage (one block)"
        " and the 1 × 1 head; the training step reads 192-wide cells instead of 1280-wide ones in the attention,"
        " the initial state and the LSTM input, and the cache (and the memory-mapped reads of every epoch) shrinks"
        " by the ratio of the widths. docs/results.md has what the cut does to the captions.",
    ])
    print(body)
    if args.write:
        write_section("The default encoder cut before its head (bench/encoder_cut.py)", body)


if __name__ == "__main__":
    main()
