"""JPEG decoding alone, the part of ``satcli caption`` that must keep up with the model.

    python -m bench.jpeg_decode [--images 256] [--size 224] [--workers N] [--device auto]

Images/s, each over the same camera-sized JPEGs (bench.caption_throughput's photos), shrunk to ``--size``:

- the CPU loader in one process (Pillow with DCT draft scaling, then an antialiased resize): one core's rate;
- the same in ``--workers`` DataLoader processes, batches of 32, as ``satcli caption`` runs them;
- on CUDA, nvJPEG: the bytes already in memory, decoded and resized on the GPU 32 at a time;
- on CUDA, the GPU pipeline: workers read bytes and headers, the main process decodes each batch with nvJPEG.
  On a CPU these two rows run the same code with torchvision's CPU decoder.

Nothing runs a model, so these are the ceilings the decoding puts on captioning.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bench.caption_throughput import make_photos
from bench.common import command, machine
from models.data import DataConfig
from satcli.captioning.loading import ImageFiles, collate
from satcli.core.device import resolve_device
from satcli.data.feed import decode_jpegs, default_workers, images_on_device, read_jpeg

log = logging.getLogger("bench.jpeg_decode")
BATCH = 32


def _resizing(size: int) -> DataConfig:
    """Images squashed to ``size`` with the default filter (the mean and std play no part in decoding)."""
    return DataConfig(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_process(files: list[str], size: int) -> float:
    dataset = ImageFiles(files, _resizing(size), None)
    start = time.perf_counter()
    for i in range(len(files)):
        assert dataset[i][1] is not None
    return len(files) / (time.perf_counter() - start)


def workers_rate(files: list[str], size: int, workers: int, device: torch.device, on_device: bool) -> float:
    """Images/s out of a DataLoader like caption's; ``on_device``: JPEG bytes decoded on ``device`` per batch."""
    config = _resizing(size)
    dataset = ImageFiles(files, config, None, jpeg_bytes=on_device)
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    start, n = time.perf_counter(), 0
    for batch in loader:
        images = images_on_device(batch, config, device, dataset.load) if batch.jpegs else batch.images.to(device)
        n += images.shape[0]
    _sync(device)
    assert n == len(files), "every bench image must decode"
    return n / (time.perf_counter() - start)


def device_rate(files: list[str], size: int, device: torch.device) -> float:
    data = [read_jpeg(f, None).data for f in files]
    decode_jpegs(data[:BATCH], _resizing(size), device)  # warm-up: nvJPEG's handles and buffers
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(data), BATCH):
        decode_jpegs(data[first : first + BATCH], _resizing(size), device)
    _sync(device)
    return len(data) / (time.perf_counter() - start)


def table(args: argparse.Namespace) -> str:
    device = resolve_device(args.device)
    workers = default_workers(device) if args.workers is None else args.workers
    work = Path(tempfile.mkdtemp(prefix="satcli-bench-jpeg-"))
    try:
        files = [str(p) for p in make_photos(work, args.images)]
        rows = [("CPU loader, one process (Pillow, DCT draft + resize)", one_process(files, args.size)),
                (f"CPU loader, {workers} DataLoader workers", workers_rate(files, args.size, workers, device, False))]
        # On CUDA nvJPEG; on a CPU the same code with torchvision's CPU decoder (full-size decode, no DCT draft).
        name = f"nvJPEG on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "torchvision on CPU"
        rows.append((f"{name}, bytes in memory, {BATCH} per call", device_rate(files, args.size, device)))
        rows.append((f"{workers} workers read bytes and headers, {name} decodes each batch in the main process",
                     workers_rate(files, args.size, workers, device, True)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| decoder | images/s |", "|---|---:|", *(f"| {name} | {rate:.1f} |" for name, rate in rows)]
    return "\n".join([f"Command: `{command()}`", "", f"Machine: {machine()}", "",
                      f"{args.images} JPEGs of 1600×1200 shrunk to {args.size}×{args.size}.", "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=None, help="default: satcli's for the device")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(table(args), flush=True)  # noqa: T201 — the bench's own report


if __name__ == "__main__":
    main()
