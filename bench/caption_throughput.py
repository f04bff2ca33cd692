"""Caption throughput: ``satcli caption`` end to end against the model alone and against one image at a time.

    python -m bench.caption_throughput [--images 300] [--slow-images 96] [--beams 1,3,5] [--repeats 2] [--write]
    python -m bench.caption_throughput --memory [--memory-images 20000] [--write]

Same model, same images (camera-sized 1600×1200 JPEGs made from scikit-image's photos with random crops,
flips and colour jitter), three ways, at each beam size:

(a) ``satcli caption``: ``satcli.commands.caption.run`` in-process, timed from the call to its return — finding the
    files, loading the checkpoint, worker processes decoding JPEGs, batched encoder + beam search, the writer
    thread, and the final merge into one Parquet file.
(b) the model-only floor: the same encoder and batched beam search (``satcli.captioning.model.caption_batch``, same
    batch size) over uint8 image tensors already in memory. Nothing is read or written.
(c) one image at a time, as scripts built on the paper's code do: load → preprocess → encode → beam search
    with a batch of 1, in one process. It uses satcli's own image loader, so all three prepare the same pixels.

The decoder is random-init (512/512/512, 2,500 words like Flickr8k); a random decoder rarely emits ``<end>``,
so every caption runs to ``--max-length`` steps and runs are comparable. EfficientNet-Lite0 has its real
ImageNet weights; ResNet-101 is random-init (its weights need a download; timing does not depend on them).

``--memory`` captions ``--memory-images`` small images (a few real JPEGs behind many symlinks) and samples the
resident memory of the process and of its DataLoader workers every half second: it must stay flat.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageEnhance

from bench.common import OtherLoad, command, cpu_seconds, machine, write_section
from models.captioner import Captioner, CaptionerConfig
from models.data import resize
from models.decoding import DecodingOptions
from satcli.captioning.loading import ImageFiles
from satcli.captioning.model import caption_batch, prepare_model
from satcli.captioning.options import CaptionOptions
from satcli.commands.caption import run
from satcli.data.feed import default_workers
from satcli.data.images import load_image
from satcli.data.vocab import SPECIALS, Vocabulary
from satcli.formats.checkpoint import load_captioner, save_checkpoint

log = logging.getLogger("bench.caption_throughput")

VOCAB_SIZE = 2500
# (encoder, image size, grid size, pretrained encoder weights)
ENCODER_SETUPS = {
    "efficientnet-lite0": ("efficientnet-lite0", 224, None, True),
    "resnet101": ("resnet101", 256, 14, False),
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def make_photos(directory: Path, n_images: int, size: tuple[int, int] = (1600, 1200), seed: int = 0) -> list[Path]:
    """``n_images`` camera-sized JPEGs: random crops of scikit-image photos, flipped and colour-jittered."""
    import skimage.data

    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_images):
        photo = sources[i % len(sources)]
        w, h = photo.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale * rng.uniform(0.85, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
        path = directory / f"photo{i:04d}.jpg"
        image.save(path, "JPEG", quality=rng.randint(85, 95))
        paths.append(path)
    return paths


def make_checkpoint(directory: Path, encoder: str) -> Path:
    """A checkpoint as ``satcli train`` would write it: the encoder, a random 512/512/512 decoder, 2,500 words."""
    name, image_size, grid, pretrained = ENCODER_SETUPS[encoder]
    torch.manual_seed(0)
    config = CaptionerConfig(vocab_size=VOCAB_SIZE, encoder=name, image_size=image_size, grid_size=grid,
                             embed_dim=512, attention_dim=512, decoder_dim=512)
    model = Captioner(config, pretrained_encoder=pretrained)
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(VOCAB_SIZE - len(SPECIALS)))])
    return save_checkpoint(directory / f"{encoder}.pt", model, vocab)


# ---------------------------------------------------------------------------------------------------------------
# The three ways
# ---------------------------------------------------------------------------------------------------------------


def time_satcli(folder: Path, checkpoint: Path, output: Path, beam: int,
                args: argparse.Namespace, variant: str | None = None) -> tuple[float, float]:
    """(a) Wall and CPU seconds for ``satcli caption FOLDER`` end to end, in-process. ``variant``: ``threads=N``
    runs it with N torch threads, ``NAME=VALUE`` with that environment variable set."""
    options = CaptionOptions(inputs=(str(folder),), model=checkpoint, output=output, overwrite=True,
                             batch_size=args.batch_size, beam_size=beam, max_length=args.max_length,
                             workers=args.workers, device=args.device)
    with _variant(variant):
        start, cpu = time.perf_counter(), cpu_seconds()
        summary = run(options)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert summary.n_captioned == summary.n_images, "every bench image must be captioned"
    return seconds, cpu


@contextlib.contextmanager
def _variant(variant: str | None) -> Iterator[None]:
    if variant is None:
        yield
        return
    name, value = variant.split("=", 1)
    if name == "threads":
        previous = torch.get_num_threads()
        torch.set_num_threads(int(value))
        try:
            yield
        finally:
            torch.set_num_threads(previous)
        return
    previous_value = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous_value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous_value


def time_floor(model: Captioner, preprocessing, images: torch.Tensor, beam: int,
               args: argparse.Namespace) -> tuple[float, float]:
    """(b) Wall and CPU seconds for encoder + batched beam search over uint8 images (N, 3, S, S) in memory."""
    options = DecodingOptions(beam_size=beam, max_length=args.max_length)
    caption_batch(model, images[: args.batch_size], preprocessing, options)  # warm-up, not timed
    _sync()
    start, cpu = time.perf_counter(), cpu_seconds()
    for first in range(0, images.shape[0], args.batch_size):
        caption_batch(model, images[first : first + args.batch_size], preprocessing, options)
    _sync()
    return time.perf_counter() - start, cpu_seconds() - cpu


def time_one_by_one(model: Captioner, preprocessing, files: list[Path], beam: int,
                    args: argparse.Namespace) -> tuple[float, float]:
    """(c) Wall and CPU seconds to load, preprocess, encode and beam-search each image on its own (batch of 1)."""
    options = DecodingOptions(beam_size=beam, max_length=args.max_length)
    size = preprocessing.image_size

    def one(file: Path) -> None:
        image = resize(load_image(file, min_size=size).image, preprocessing)
        caption_batch(model, image.unsqueeze(0), preprocessing, options)

    one(files[0])  # warm-up, not timed
    _sync()
    start, cpu = time.perf_counter(), cpu_seconds()
    for file in files:
        one(file)
    _sync()
    return time.perf_counter() - start, cpu_seconds() - cpu


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


WAYS = ("satcli", "floor", "one_by_one")


@dataclass
class Row:
    """Per way, one (wall seconds, CPU seconds) per repeat. Ratios are taken within a repeat, then the median."""

    encoder: str
    beam: int
    n_images: int
    times: dict[str, list[tuple[float, float]]]

    def rate(self, way: str) -> float:
        """Median images per second."""
        return statistics.median(self.n_images / wall for wall, _ in self.times[way])

    def ratio(self, way: str) -> list[float]:
        """(a)'s images/s over ``way``'s, per repeat, sorted."""
        return sorted(other / wall for (wall, _), (other, _) in zip(self.times["satcli"], self.times[way],
                                                                   strict=True))

    def cpu_ms(self, way: str) -> float:
        """Median CPU milliseconds per image."""
        return statistics.median(1000 * cpu / self.n_images for _, cpu in self.times[way])


def throughput(args: argparse.Namespace) -> tuple[list[Row], float]:
    """The rows of the table, and the share of the CPU other processes used meanwhile."""
    work = Path(tempfile.mkdtemp(prefix="satcli-bench-"))
    try:
        folder = work / "photos"
        started = time.perf_counter()
        files = make_photos(folder, args.images)
        log.info("made %d JPEGs of 1600×1200 in %.0f s (%.0f KB each on average)", len(files),
                 time.perf_counter() - started, statistics.mean(f.stat().st_size for f in files) / 1024)
        rows = []
        load = OtherLoad().start()
        for encoder in args.encoders:
            n_images = args.images if encoder == "efficientnet-lite0" else min(args.slow_images, args.images)
            subset, subset_folder = files[:n_images], folder
            if n_images < len(files):  # a folder holding just the first n_images, for (a)
                subset_folder = work / f"photos-{n_images}"
                subset_folder.mkdir()
                for file in subset:
                    (subset_folder / file.name).symlink_to(file)
            checkpoint = make_checkpoint(work, encoder)
            loaded = load_captioner(checkpoint, args.device if args.device != "auto" else _auto())
            model = prepare_model(loaded.model, loaded.model.device)
            pre = loaded.preprocessing
            dataset = ImageFiles([str(f) for f in subset], pre, None)
            # The same pixels (a) computes, already on the model's device: (b) is the model alone.
            images = torch.stack([dataset[i][1] for i in range(len(subset))]).to(model.device)
            for beam in args.beams:
                row = Row(encoder, beam, len(subset), {way: [] for way in WAYS})
                for repeat in range(args.repeats):
                    # Interleaved, so that a slow spell on a shared machine hits all three alike.
                    row.times["satcli"].append(time_satcli(subset_folder, checkpoint, work / "out.parquet", beam,
                                                           args))
                    row.times["floor"].append(time_floor(model, pre, images, beam, args))
                    row.times["one_by_one"].append(time_one_by_one(model, pre, subset, beam, args))
                    if args.variant is not None:
                        row.times.setdefault("variant", []).append(
                            time_satcli(subset_folder, checkpoint, work / "out.parquet", beam, args, args.variant))
                        log.info("  with %s during (a): %.2f images/s", args.variant,
                                 len(subset) / row.times["variant"][-1][0])
                    log.info("%s beam %d, repeat %d: %s images/s (satcli, floor, one by one)", encoder, beam,
                             repeat + 1, ", ".join(f"{len(subset) / row.times[w][-1][0]:.2f}" for w in WAYS))
                rows.append(row)
        return rows, load.share()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _auto() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def throughput_table(rows: list[Row], other_load: float, args: argparse.Namespace) -> str:
    lines = [
        "| encoder | images | beam | (a) satcli caption, images/s | (b) model-only floor, images/s | "
        "(c) one at a time, images/s | (a)/(b) | (a)/(c) | CPU ms per image (a) / (b) / (c) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def spread(values: list[float]) -> str:
        median = statistics.median(values)
        return f"**{median:.2f}**" + (f" ({values[0]:.2f}–{values[-1]:.2f})" if len(values) > 1 else "")

    for r in rows:
        name, size, grid, pretrained = ENCODER_SETUPS[r.encoder]
        label = f"{name} {size}px" + (f", grid {grid}×{grid}" if grid else "") + ("" if pretrained else " (random)")
        lines.append(f"| {label} | {r.n_images} | {r.beam} | {r.rate('satcli'):.2f} | {r.rate('floor'):.2f} | "
                     f"{r.rate('one_by_one'):.2f} | {spread(r.ratio('floor'))} | {spread(r.ratio('one_by_one'))} | "
                     + " / ".join(f"{r.cpu_ms(w):.0f}" for w in WAYS) + " |")
    extra = []
    if args.variant is not None:
        extra = ["", f"(a′): (a) again in the same turn with `{args.variant}` ("
                 + ("torch's threads during the run; " if args.variant.startswith("threads=") else "")
                 + f"torch's default here is {torch.get_num_threads()} threads).", "",
                 "| encoder | beam | (a) images/s | (a′) images/s | (a′)/(a) | (a′)/(b) | CPU ms per image (a′) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            pairs = zip(r.times["satcli"], r.times["variant"], r.times["floor"], strict=True)
            turns = [(a / a2, b / a2) for (a, _), (a2, _), (b, _) in pairs]
            extra.append(f"| {r.encoder} | {r.beam} | {r.rate('satcli'):.2f} | {r.rate('variant'):.2f} | "
                         f"{statistics.median(t[0] for t in turns):.2f} | {statistics.median(t[1] for t in turns):.2f}"
                         f" | {r.cpu_ms('variant'):.0f} |")
    device = torch.device(_auto() if args.device == "auto" else args.device)
    workers = default_workers(device) if args.workers is None else args.workers
    decoders = ("JPEGs decoded in workers" if device.type == "cpu" else
                "JPEGs read by the workers and decoded by nvJPEG on the GPU, other files decoded in workers")
    return "\n".join([
        f"Command: `{command()}`",
        "",
        f"Machine: {machine()}",
        "",
        f"{args.images} JPEGs of 1600×1200 (scikit-image photos, cropped, flipped, colour-jittered; ResNet-101, "
        f"about 5× slower, gets the first {min(args.slow_images, args.images)}), batch size "
        f"{args.batch_size}, {workers} DataLoader workers, max length {args.max_length} (a random decoder "
        "rarely emits `<end>`, so every caption is that long), decoder 512/512/512 with 2,500 words, random "
        "init. EfficientNet-Lite0 has its ImageNet weights; ResNet-101 is random-init (timing only). "
        "(a) is timed from the call of `satcli.commands.caption.run` to its return (files found, checkpoint loaded, "
        f"{decoders}, results written and merged); (b) is the same encoder and batched beam "
        f"search on uint8 tensors already in {'memory' if device.type == 'cpu' else 'GPU memory'}; "
        "(c) loads, preprocesses, encodes and searches one image "
        "at a time (batch of 1) with the same loader and model. The three run in turn, "
        f"{args.repeats} times; the table gives medians of images/s and of the ratios within a turn (their "
        f"range in brackets: this machine's {os.cpu_count()} cores are shared with other work, so wall times vary "
        "from turn to turn). CPU ms per image counts this process and its DataLoader workers. While the benchmark ran, "
        f"other processes used {100 * other_load:.0f}% of the machine's CPU time (from /proc/stat).",
        "",
        *lines,
        *extra,
    ])


# ---------------------------------------------------------------------------------------------------------------
# Memory over a long run
# ---------------------------------------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


class MemorySampler(threading.Thread):
    """Every ``interval`` seconds: (images done, RSS of this process, summed RSS of its child processes)."""

    def __init__(self, progress: Callable[[], int], interval: float = 0.5):
        super().__init__(daemon=True)
        self.progress = progress
        self.interval = interval
        self.samples: list[tuple[int, int, int]] = []
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pid = os.getpid()
        self.samples.append((self.progress(), _rss_bytes(pid), sum(_rss_bytes(c) for c in _children(pid))))

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def memory(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="satcli-bench-memory-"))
    try:
        originals = make_photos(work / "originals", 8, size=(640, 480))
        folder = work / "photos"
        folder.mkdir()
        for i in range(args.memory_images):  # many names, few files: the pipeline cannot tell
            (folder / f"img{i:06d}.jpg").symlink_to(originals[i % len(originals)])
        checkpoint = make_checkpoint(work, "efficientnet-lite0")
        output = work / "captions.parquet"
        sidecar = work / "captions.parquet.partial"

        seen = [0]

        def done() -> int:
            """Images written so far (chunks × batch size, the last chunk counted whole), never decreasing."""
            if output.exists():
                seen[0] = args.memory_images
            elif sidecar.exists():
                chunks = len(list(sidecar.glob("chunk-*.parquet")))
                seen[0] = max(seen[0], min(chunks * args.batch_size, args.memory_images))
            return seen[0]

        sampler = MemorySampler(done)
        sampler.sample()
        sampler.start()
        started = time.perf_counter()
        try:
            summary = run(CaptionOptions(inputs=(str(folder),), model=checkpoint, output=output, overwrite=True,
                                         batch_size=args.batch_size, beam_size=args.memory_beam,
                                         max_length=args.memory_max_length, workers=args.workers,
                                         device=args.device, progress=False))
        finally:
            sampler.stop()
        seconds = time.perf_counter() - started
        assert summary.n_captioned == args.memory_images
        samples = sampler.samples
        mib = 1 / 2**20

        def at(fraction: float) -> tuple[int, int, int]:
            target = fraction * args.memory_images
            return next((s for s in samples if s[0] >= target), samples[-1])

        lines = ["| point | images done | main process RSS, MiB | workers' RSS (sum), MiB |", "|---|---:|---:|---:|"]
        lines.append(f"| before the run | 0 | {samples[0][1] * mib:.0f} | {samples[0][2] * mib:.0f} |")
        for label, fraction in (("10%", 0.1), ("50%", 0.5), ("100%", 1.0)):
            n, main, kids = at(fraction)
            lines.append(f"| {label} | {n:,} | {main * mib:.0f} | {kids * mib:.0f} |")
        lines.append(f"| after the merge | {args.memory_images:,} | {samples[-1][1] * mib:.0f} | "
                     f"{samples[-1][2] * mib:.0f} |")
        lines.append(f"| peak | | {max(s[1] for s in samples) * mib:.0f} | {max(s[2] for s in samples) * mib:.0f} |")
        workers = default_workers() if args.workers is None else args.workers
        return "\n".join([
            f"Command: `{command()}`",
            "",
            f"Machine: {machine()}",
            "",
            f"{args.memory_images:,} images (8 distinct 640×480 JPEGs behind symlinks), EfficientNet-Lite0 224px, "
            f"random 512/512/512 decoder, beam {args.memory_beam}, max length {args.memory_max_length}, batch size "
            f"{args.batch_size}, {workers} workers: {seconds / 60:.1f} min, "
            f"{args.memory_images / seconds:.1f} images/s, {len(samples)} samples of resident memory (RSS; the "
            "workers' sum counts pages they share with the main process more than once).",
            "",
            *lines,
        ])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--slow-images", type=int, default=96, help="images for ResNet-101 (the first ones)")
    parser.add_argument("--beams", type=lambda s: [int(b) for b in s.split(",")], default=[1, 3, 5])
    parser.add_argument("--encoders", type=lambda s: s.split(","), default=list(ENCODER_SETUPS))
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="turns of (a), (b), (c); medians are reported")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="default: satcli's, min(4, CPUs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", default=None, help="also time (a) with threads=N (torch's threads) or "
                        "NAME=VALUE (an environment variable), as (a′) in a second table")
    parser.add_argument("--memory", action="store_true", help="the long memory run instead of the throughput table")
    parser.add_argument("--memory-images", type=int, default=20_000)
    parser.add_argument("--memory-beam", type=int, default=1)
    parser.add_argument("--memory-max-length", type=int, default=12)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("satcli").setLevel(logging.WARNING)
    print(f"$ {command()}\n{machine()}", flush=True)  # noqa: T201 — the bench's own report
    if args.memory:
        heading, body = "Caption memory over a long run (bench/caption_throughput.py --memory)", memory(args)
    else:
        heading, body = "Caption throughput (bench/caption_throughput.py)", throughput_table(*throughput(args), args)
    print(body, flush=True)  # noqa: T201
    if args.write:
        write_section(heading, body)


if __name__ == "__main__":
    main()
