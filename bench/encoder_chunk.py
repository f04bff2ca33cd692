"""Encoder throughput on the CPU by the number of images per trunk call.

    python -m bench.encoder_chunk [--images 64] [--repeats 3] [--write]

The same 64 random images go through the frozen encoder in calls of 1, 2, 4, 8, 16 and 64 images; chunk sizes
take turns within each repeat and the best turn of each is kept, so a burst of load from other processes on this
shared machine hurts one turn, not one chunk size. ``models.encoders.CPU_CHUNK`` is the size satcli uses.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import command, machine, write_section
from models.encoders import CPU_CHUNK, Encoder

SETUPS = {"efficientnet-lite0 224px": ("efficientnet-lite0", 224), "resnet101 256px": ("resnet101", 256)}
CHUNKS = (1, 2, 4, 8, 16, 64)


@torch.inference_mode()
def measure(name: str, size: int, n_images: int, repeats: int) -> dict[int, float]:
    """Best images/s per chunk size: the trunk is called directly, one chunk at a time."""
    encoder = Encoder(name, pretrained=False).eval()
    images = torch.randn(n_images, 3, size, size)
    encoder._forward(images[:2])  # warm-up: first-call allocations
    best: dict[int, float] = {}
    for _ in range(repeats):
        for chunk in CHUNKS:
            start = time.perf_counter()
            for part in images.split(chunk):
                encoder._forward(part)
            best[chunk] = max(best.get(chunk, 0.0), n_images / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace the section in docs/benchmarks.md")
    args = parser.parse_args()
    print(f"$ {command()}\n{machine()}")
    rows = []
    for label, (name, size) in SETUPS.items():
        best = measure(name, size, args.images, args.repeats)
        whole = best[max(CHUNKS)]
        rows.append(f"| {label} | " + " | ".join(f"{best[c]:.1f}" for c in CHUNKS)
                    + f" | **{best[CPU_CHUNK] / whole:.2f}×** |")
        print(rows[-1], flush=True)
    header = ("| encoder | " + " | ".join(f"{c} per call" for c in CHUNKS) + f" | {CPU_CHUNK} / {max(CHUNKS)} |\n"
              + "|---|" + "---:|" * (len(CHUNKS) + 1))
    body = (f"Command: `{command()}`  \nMachine: {machine()}\n\n"
            f"Images/s through the frozen encoder (random init; {args.images} images of the given size), best of "
            f"{args.repeats} interleaved turns. satcli calls the trunk {CPU_CHUNK} images at a time on a CPU "
            "whatever the batch size (`models.encoders.CPU_CHUNK`); the last column is that against one call per "
            "batch of 64.\n\n" + header + "\n" + "\n".join(rows))
    print(body)
    if args.write:
        write_section("Encoder images per call on a CPU (bench/encoder_chunk.py)", body)


if __name__ == "__main__":
    main()
