"""``satcli caption``: stream photo directories through batched beam search into a results Parquet file.

The pipeline keeps the model busy: DataLoader worker processes open, decode and shrink images (uint8, so
little crosses the process boundary); the main process normalises whole batches on the device and runs the
encoder and the batched beam search; a writer thread turns results into Arrow and writes them, so the device
never waits for the disk.

Resuming. Each batch of results is written as its own small Parquet file ("chunk"), atomically, into a
sidecar directory next to the output (``captions.parquet.partial/``). A rerun of the same command skips the
images already in chunks — batches are cut at fixed positions of the sorted input list, so the resumed run
sees exactly the batches an uninterrupted one would — and when every image is done the chunks are merged
into the output (temporary file + rename) and the sidecar is removed. A kill at any moment loses at most the
``UNSAVED_BATCHES`` (2) batches: the one being written and the one on the device; with a slow disk the device
waits rather than run ahead. A finished output is extended the same way when new images appear under the inputs.

Sharding. Under ``torchrun`` (``RANK``/``WORLD_SIZE``) or with ``--shard K/N``, rank K captions every N-th
image of the sorted list, starting at the K-th, into ``captions.part-K-of-N.parquet``; ``satcli merge``
joins the parts.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from models.captioner import Captioner
from models.data import DataConfig, normalise, resize
from models.decoding import DecodingOptions, DecodingResult, decode
from satcli import __version__
from satcli.atomic import disk_error, write_text
from satcli.checkpoint import checkpoint_sha256, load_captioner, read_checkpoint
from satcli.console import make_progress
from satcli.defaults import default_model
from satcli.device import resolve_device
from satcli.errors import SatcliError
from satcli.feed import JpegBytes, default_workers, images_on_device, jpeg_decode_device, read_jpeg
from satcli.images import (
    DEFAULT_MAX_PIXELS,
    HARD_MAX_PIXELS,
    ImageError,
    is_image_name,
    load_image,
)
from satcli.overlays import OverlaySummary, write_overlays
from satcli.results import CaptionRow, merge_results, read_column, read_metadata, to_table, write_results
from satcli.text import detokenize
from satcli.vocab import banned_words

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("captions.parquet")
# Batches between the start of their captioning and the end of their write: the one being written and the one on
# the device (or waiting for the writer). With a slow disk the device waits rather than run further ahead, so a
# kill loses at most these.
UNSAVED_BATCHES = 2


@dataclass(frozen=True)
class CaptionOptions:
    """What ``satcli caption`` was asked to do."""

    inputs: tuple[str, ...]  # files, directories (walked recursively) and glob patterns
    model: Path | None = None  # None: $SATCLI_MODEL, else the last model trained here
    output: Path = DEFAULT_OUTPUT
    overwrite: bool = False  # ignore any earlier results or unfinished run for this output
    batch_size: int = 32
    beam_size: int = 3
    max_length: int = DecodingOptions.max_length
    length_penalty: float = 0.0
    n_best: int = 1  # > 1: the runners-up go to the ``alternatives`` column
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    allow_unk: bool = False  # let captions contain <unk> (banned by default: users would see a literal "<unk>")
    workers: int | None = None  # image-decoding processes; None: min(4, CPUs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    shard: tuple[int, int] | None = None  # (K, N); None: RANK/WORLD_SIZE under torchrun, else everything
    root: Path | None = None  # result paths are relative to this directory (None: the current one)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    progress: bool = True
    overlays: Path | None = None  # a folder: attention pictures of every captioned image, after the Parquet


@dataclass
class CaptionSummary:
    """What a caption run did. Counts cover the whole output file; ``n_processed`` only this run."""

    output: Path
    n_images: int
    n_resumed: int = 0
    n_processed: int = 0
    n_captioned: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    shard: tuple[int, int] = (0, 1)
    overlays: OverlaySummary | None = None

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def images_per_second(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> Table:
        """The end-of-run summary shown by the CLI."""
        title = "Captions" if self.shard[1] == 1 else f"Captions, part {self.shard[0]} of {self.shard[1]}"
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("images", f"{self.n_images:,}")
        if self.n_resumed:
            table.add_row("done before", f"{self.n_resumed:,}")
        table.add_row("captioned", f"{self.n_captioned:,}")
        table.add_row("errors", f"{self.n_errors:,}")
        for kind, n in sorted(self.errors.items()):
            table.add_row(f"  {kind}", f"{n:,}")
        if self.n_processed:
            table.add_row("time", f"{self.seconds:.1f} s")
            table.add_row("images/s", f"{self.images_per_second:.1f}")
            table.add_row("device", self.device)
        table.add_row("output", str(self.output))
        if self.overlays is not None:
            table.add_row("attention pictures", f"{self.overlays.n_written:,} in {self.overlays.directory}")
            if self.overlays.n_missing_images:
                table.add_row("  images not found", f"{self.overlays.n_missing_images:,} (drawn grey)")
        return table


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ImageSource:
    """An input image: ``path`` as written to the results, ``file`` the absolute path to open."""

    path: str
    file: str


def find_images(inputs: Sequence[str], root: str | Path | None = None) -> list[ImageSource]:
    """Files, directories (recursive) and glob patterns → image files, sorted by their result path.

    Inside directories and glob matches, hidden names and non-image extensions are skipped; a file named
    explicitly is taken whatever its name (it becomes an error row if it is no image). Directory symlinks are
    followed once (a loop is harmless). ``path`` is relative to ``root`` when the file lies under it (the
    current directory by default), else absolute; symlinks are not resolved, so paths read as the user wrote.
    """
    base = os.path.abspath(root if root is not None else os.getcwd())
    found: dict[str, ImageSource] = {}

    def add(file: str) -> None:
        absolute = os.path.abspath(file)
        relative = os.path.relpath(absolute, base)
        shown = printable_path(absolute if relative == ".." or relative.startswith(".." + os.sep) else relative)
        found.setdefault(shown, ImageSource(shown, absolute))

    for pattern in inputs:
        if os.path.isdir(pattern):
            for file in _walk(pattern):
                add(file)
        elif os.path.lexists(pattern):
            add(pattern)
        elif glob.has_magic(pattern):
            matches = glob.glob(pattern, recursive=True)
            if not matches:
                raise SatcliError("the pattern matches no files", pattern)
            for match in matches:
                if os.path.isdir(match):
                    for file in _walk(match):
                        add(file)
                elif is_image_name(match):
                    add(match)
        else:
            raise SatcliError("no such file or directory", pattern)
    return sorted(found.values())


def printable_path(path: str) -> str:
    """``path`` as valid UTF-8: bytes of a name that is not (Python holds them as lone surrogates) become ``\\xNN``.

    Such a file cannot be named in the results' UTF-8 ``path`` column, so it gets a ``bad-name`` error row
    under this spelling instead of a caption (docs/formats.md).
    """
    if utf8_name(path):
        return path
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_name(path: str) -> bool:
    """Whether ``path`` is valid UTF-8 (False for names read from disk with undecodable bytes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


BAD_NAME = "bad-name: the file name is not valid UTF-8 (its bytes are shown as \\xNN); rename the file to caption it"


def _walk(top: str) -> Iterator[str]:
    seen: set[tuple[int, int]] = set()
    for directory, dirnames, filenames in os.walk(top, followlinks=True, onerror=_walk_error):
        try:
            info = os.stat(directory)
        except OSError:
            dirnames.clear()
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:  # reached again through a symlink: a loop, or the same tree twice
            dirnames.clear()
            continue
        seen.add(key)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                yield os.path.join(directory, name)


def _walk_error(error: OSError) -> None:
    log.warning("cannot read directory %s: %s", error.filename, error.strerror)


# ---------------------------------------------------------------------------------------------------------------
# Shards, devices, options
# ---------------------------------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N): this run takes shard K (counted from 0) of N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SatcliError(f"--shard must look like K/N (shard K of N, K from 0), e.g. 0/4; got {text!r}") from None
    return resolve_shard((index, count))


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """(K, N) from ``--shard``, else from torchrun's ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        shard = (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise SatcliError(f"shard {index}/{count} is not a shard: use K/N with 0 ≤ K < N")
    return index, count


def part_path(output: Path, index: int, count: int) -> Path:
    """``captions.parquet`` → ``captions.part-K-of-N.parquet`` (the part written by shard K of N)."""
    if count == 1:
        return output
    suffix = output.suffix or ".parquet"
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.part-{index}-of-{count}{suffix}")


def decoding_options(options: CaptionOptions) -> DecodingOptions:
    try:
        return DecodingOptions(beam_size=options.beam_size, max_length=options.max_length,
                               length_penalty=options.length_penalty, n_best=options.n_best,
                               no_repeat_ngram_size=options.no_repeat_ngram_size, min_length=options.min_length,
                               banned_ids=banned_words(options.allow_unk))
    except ValueError as error:
        raise SatcliError(str(error)) from None


def _check(options: CaptionOptions) -> None:
    if options.batch_size < 1:
        raise SatcliError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.workers is not None and options.workers < 0:
        raise SatcliError(f"--workers must be 0 or more, got {options.workers}")
    if options.max_pixels is not None and not 1 <= options.max_pixels <= HARD_MAX_PIXELS:
        raise SatcliError(f"--max-pixels must be between 1 and {HARD_MAX_PIXELS:,} (Pillow's own hard limit), "
                          f"got {options.max_pixels:,}")
    if options.output.exists() and options.output.is_dir():
        raise SatcliError("the output is a directory; name a .parquet file with -o", options.output)
    if options.overlays is not None and options.overlays.exists() and not options.overlays.is_dir():
        raise SatcliError("--overlays names a file; name a folder for the attention pictures", options.overlays)


# ---------------------------------------------------------------------------------------------------------------
# The model on the device
# ---------------------------------------------------------------------------------------------------------------


def prepare_model(model: Captioner, device: torch.device) -> Captioner:
    """Eval mode on ``device``; channels-last convolutions (about 2× faster for EfficientNet on CPU)."""
    model = model.to(device).eval()
    model.encoder.to(memory_format=torch.channels_last)
    return model


def caption_batch(model: Captioner, images: torch.Tensor, preprocessing: DataConfig,
                  options: DecodingOptions) -> list[DecodingResult]:
    """uint8 images (B, 3, S, S), on any device → one DecodingResult per image (encoder + batched beam search).

    Normalises on the model's device; on CUDA runs under autocast (bfloat16 where supported, else float16).
    """
    device = model.device
    x = images.to(device, non_blocking=True)
    x = normalise(x, preprocessing).contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast: contextlib.AbstractContextManager = torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext()
    with autocast:
        return decode(model, x, options)


# ---------------------------------------------------------------------------------------------------------------
# Image loading in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Image files → ``(index, uint8 (3, S, S) or None, width, height, error)``.

    With ``jpeg_bytes``, plain JPEGs come back undecoded (:class:`satcli.feed.JpegBytes`) for the GPU decoder.
    File names live in one Arrow array, not a Python list: forked workers then share its pages instead of
    copying them one reference count at a time (which makes DataLoader memory grow with the number of files).
    """

    def __init__(self, files: Sequence[str], data: DataConfig, max_pixels: int | None, jpeg_bytes: bool = False):
        # A name that is not UTF-8 cannot go into Arrow (nor into the results): it becomes a bad-name row.
        self.files = pa.array([file if utf8_name(file) else None for file in files], pa.string())
        self.data = data
        self.max_pixels = max_pixels
        self.jpeg_bytes = jpeg_bytes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | JpegBytes | None, int | None, int | None,
                                               str | None]:
        if self.jpeg_bytes and self.files[index].is_valid:
            try:
                raw = read_jpeg(self.files[index].as_py(), self.max_pixels)
            except ImageError as error:
                return index, None, error.width, error.height, str(error)
            if raw is not None:
                return index, raw, raw.width, raw.height, None
        return self.load(index)

    def load(self, index: int) -> tuple[int, torch.Tensor | None, int | None, int | None, str | None]:
        """Decode on the CPU, whatever the file."""
        file = self.files[index].as_py()
        if file is None:
            return index, None, None, None, BAD_NAME
        try:
            loaded = load_image(file, self.max_pixels, min_size=self.data.image_size)
            return index, resize(loaded.image, self.data), loaded.width, loaded.height, None
        except ImageError as error:
            return index, None, error.width, error.height, str(error)
        except Exception as error:  # noqa: BLE001 — one strange file must not end a long run
            return index, None, None, None, f"failed: {type(error).__name__}: {str(error)[:200]}"


def _lower_priority(worker_id: int) -> None:
    """Used when the model runs on the CPU, where the workers share the cores with it: at a lower priority they
    decode mostly in the cycles the model leaves free instead of preempting one of its threads mid-operation
    (which stalls the others at the next barrier). When the model waits for images they get the CPU anyway."""
    with contextlib.suppress(OSError):
        os.nice(10)


@dataclass
class _Batch:
    indices: list[int]
    images: torch.Tensor  # (n_ok, 3, S, S) uint8, the images that loaded
    loaded: list[bool]
    widths: list[int | None]
    heights: list[int | None]
    errors: list[str | None]
    jpegs: dict[int, torch.Tensor] = field(default_factory=dict)  # position → JPEG bytes, for the GPU decoder

    def pin_memory(self) -> _Batch:  # called by the DataLoader's pinning thread on CUDA
        self.images = self.images.pin_memory()
        return self


def _collate(items: list[tuple]) -> _Batch:
    images = [image for _, image, _, _, _ in items if isinstance(image, torch.Tensor)]
    jpegs = {position: item[1].data for position, item in enumerate(items) if isinstance(item[1], JpegBytes)}
    stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
    return _Batch([i for i, *_ in items], stacked, [image is not None for _, image, *_ in items],
                  [w for *_, w, _, _ in items], [h for *_, h, _ in items], [e for *_, e in items], jpegs)


# ---------------------------------------------------------------------------------------------------------------
# Resume state: chunks in a sidecar directory
# ---------------------------------------------------------------------------------------------------------------


class RunState:
    """The sidecar directory of an unfinished run: ``run.json``, ``lock`` and ``chunk-NNNNNN.parquet`` files."""

    def __init__(self, output: Path):
        self.output = output
        self.directory = output.with_name(output.name + ".partial")
        self._lock_file: Any = None
        self._next = 0

    @property
    def chunks(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.parquet"))

    def lock(self) -> None:
        """Take the sidecar's lock; another live process writing the same output is refused.

        The sidecar must be a real folder: a symlink (or a file) of that name is refused, so nothing is ever
        written, or deleted, through it outside the output's own folder.
        """
        if self.directory.is_symlink() or (self.directory.exists() and not self.directory.is_dir()):
            raise SatcliError("is in the way of the folder satcli keeps an unfinished run in (it is a symbolic "
                              "link or a file, not a folder satcli made); move it away or write elsewhere with -o",
                              self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.directory / "lock", "w")  # noqa: SIM115 — held for the whole run
        except OSError as error:
            raise disk_error(error, self.directory, "cannot create the folder for the unfinished run") from error
        try:
            # A POSIX record lock, not flock: DataLoader workers forked later must not inherit it, or a worker
            # outliving a killed run would block the rerun that resumes it. The kernel drops it when we die.
            lock_exclusive(self._lock_file)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise SatcliError("another satcli caption is writing this output right now", self.output) from None

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def start(self, fingerprint: dict[str, Any], overwrite: bool) -> set[str]:
        """Open (or start) the run and return the paths its chunks already hold."""
        self.lock()
        recorded = self.directory / "run.json"
        if overwrite:
            self._remove_own_files(keep_lock=True)
        if recorded.exists():
            try:
                previous = json.loads(recorded.read_text(encoding="utf-8"))["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                previous = None
            if previous != fingerprint:
                self.unlock()
                raise SatcliError(f"an unfinished run for this output used {_difference(previous, fingerprint)}; "
                                  "run with --overwrite to start again, or with the same model and options to "
                                  "finish it", self.output)
        for stale in [*self.directory.glob(".chunk-*.tmp"), *self.directory.glob(".run.json.*.tmp")]:
            stale.unlink(missing_ok=True)  # temporary files of a chunk being written when killed (we hold the lock)
        if not recorded.exists():
            write_json_atomic(recorded, {"fingerprint": fingerprint, "satcli_version": __version__})
        done: set[str] = set()
        for chunk in self.chunks:
            try:
                done.update(read_column(chunk, "path"))
            except SatcliError:
                log.warning("%s is unreadable; its images will be captioned again", chunk)
                chunk.unlink(missing_ok=True)
        numbers = [int(c.stem.split("-")[1]) for c in self.chunks]
        self._next = max(numbers, default=-1) + 1
        return done

    def write_chunk(self, rows: list[CaptionRow], metadata: dict[str, Any]) -> Path:
        """Write one batch of rows (sorted by path) as the next chunk, atomically."""
        path = self.directory / f"chunk-{self._next:06d}.parquet"
        self._next += 1
        rows = sorted(rows, key=lambda r: r.path)
        return write_results(path, to_table(rows), metadata)

    def remove(self) -> None:
        """Delete the sidecar: the files the run wrote, then the folder if nothing else is in it."""
        self.unlock()
        self._remove_own_files(keep_lock=False)
        try:
            self.directory.rmdir()
        except OSError:
            log.warning("%s holds files satcli did not write; it is left in place", self.directory)

    def _remove_own_files(self, keep_lock: bool) -> None:
        """Only what a run writes here: ``lock``, ``run.json``, chunks and their temporary files."""
        for old in self.directory.iterdir():
            own = (old.name in ("lock", "run.json") or _CHUNK.match(old.name)
                   or (old.name.startswith((".chunk-", ".run.json.")) and old.name.endswith(".tmp")))
            if own and not (keep_lock and old.name == "lock") and not old.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()


_CHUNK = re.compile(r"^chunk-\d+\.parquet$")


def lock_exclusive(file: Any) -> None:
    """Lock an open file for this process, or raise OSError when another holds it. POSIX: ``lockf`` (imported
    here, not at the top, so satcli imports on Windows); Windows: ``msvcrt``'s byte-range lock."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True))


def _difference(previous: dict[str, Any] | None, current: dict[str, Any]) -> str:
    if not isinstance(previous, dict):
        return "an unknown model or options"
    changed = [key for key in current if previous.get(key) != current.get(key)]
    if "model_sha256" in changed:
        return "a different model"
    return "different options (" + ", ".join(f"{k} {previous.get(k)} → {current.get(k)}" for k in changed) + ")"


# ---------------------------------------------------------------------------------------------------------------
# The writer thread
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Done:
    """A captioned batch on its way to the disk."""

    paths: list[str]
    widths: list[int | None]
    heights: list[int | None]
    errors: list[str | None]
    results: list[DecodingResult | None]


class ChunkWriter:
    """Turns finished batches into chunk files on a thread, behind a bounded queue."""

    def __init__(self, state: RunState, metadata: dict[str, Any], words: list[str]):
        self.state = state
        self.metadata = metadata
        self.words = words
        self.n_best = metadata["satcli.decoding"]["n_best"]  # > 1: runners-up go to the alternatives column
        self.error_kinds: dict[str, int] = {}
        self.n_written = 0
        self._queue: queue.Queue[_Done | None] = queue.Queue(maxsize=UNSAVED_BATCHES)
        self._room = threading.Semaphore(UNSAVED_BATCHES)  # released when a batch is on disk
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="satcli-chunk-writer", daemon=True)
        self._thread.start()

    def reserve(self) -> None:
        """Wait until fewer than ``UNSAVED_BATCHES`` captioned batches are off the disk; call before captioning
        the next batch. Raises if a write failed."""
        while not self._room.acquire(timeout=0.5):
            self._raise_failure()
        self._raise_failure()

    def put(self, done: _Done) -> None:
        while True:
            self._raise_failure()
            try:
                self._queue.put(done, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write everything queued, then stop. Raises if a write failed."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            error = self._failure
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise SatcliError(f"cannot write results: {reason}", self.state.directory) from error

    def _loop(self) -> None:
        while True:
            done = self._queue.get()
            if done is None or self._failure is not None:
                return
            try:
                self.state.write_chunk(self._rows(done), self.metadata)
                self.n_written += len(done.paths)
            except BaseException as error:  # noqa: BLE001 — handed to the main thread
                self._failure = error
            finally:
                self._room.release()

    def _rows(self, done: _Done) -> list[CaptionRow]:
        rows = []
        for path, width, height, error, result in zip(done.paths, done.widths, done.heights, done.errors,
                                                       done.results, strict=True):
            if result is None:
                rows.append(CaptionRow(path, image_width=width, image_height=height, error=error))
                continue
            best = result.best
            tokens = [self.words[i] for i in best.tokens]
            alternatives = None
            if self.n_best > 1:
                alternatives = [(detokenize([self.words[i] for i in h.tokens]), h.sum_logprob, h.finished)
                                for h in result.hypotheses[1:]]
            rows.append(CaptionRow(path, detokenize(tokens), tokens, best.sum_logprob, best.finished,
                                   best.attention.float().numpy(), width, height, alternatives=alternatives,
                                   token_logprobs=best.token_logprobs))
        return rows


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def run(options: CaptionOptions) -> CaptionSummary:
    """Caption every image named by ``options.inputs`` into ``options.output`` (or this shard's part), then
    draw the attention pictures into ``options.overlays`` when asked (after the Parquet: the captioning loop
    never waits for them, and an interrupted run keeps its captions)."""
    summary = _run(options)
    if options.overlays is not None:
        summary.overlays = write_overlays(summary.output, options.root, options.overlays, progress=options.progress)
    return summary


def _run(options: CaptionOptions) -> CaptionSummary:
    started = time.perf_counter()
    _check(options)
    decoding = decoding_options(options)
    shard = resolve_shard(options.shard)
    output = part_path(options.output, *shard)
    sources = find_images(options.inputs, options.root)
    if not sources:
        raise SatcliError("no images found (JPEG, PNG, WebP, GIF, BMP or TIFF files) in " + " ".join(options.inputs))
    sources = sources[shard[0]::shard[1]]
    device = resolve_device(options.device)
    model_path = Path(options.model if options.model is not None else default_model())
    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps with reading the checkpoint
        sha256 = pool.submit(checkpoint_sha256, model_path)
        checkpoint = read_checkpoint(model_path)  # validated now; the model is built once the workers are busy
        fingerprint = _fingerprint(checkpoint, sha256.result(), decoding, options)
    data = DataConfig.from_dict(checkpoint["preprocessing"])
    metadata = _metadata(checkpoint, model_path, decoding, options, shard, fingerprint)
    del checkpoint  # its weights are not needed twice: forked workers would keep this copy alive
    summary = CaptionSummary(output, len(sources), device=str(device), shard=shard)

    state = RunState(output)
    keep = {s.path for s in sources}
    seed = _previous_output(output, fingerprint, options.overwrite)
    done_before = set(seed or ()) & keep
    state_existed = state.directory.exists() and not options.overwrite
    if not state_existed and seed is not None and len(done_before) == len(keep) == len(seed):
        summary.n_resumed = len(keep)
        _count(summary, read_column(output, "error"))
        summary.seconds = time.perf_counter() - started
        log.info("Nothing to do: all %d images are already in %s", len(keep), output)
        return summary
    try:
        done_before |= state.start(fingerprint, options.overwrite) & keep
        summary.n_resumed = len(done_before)
        if summary.n_resumed:
            log.info("Resuming: %d of %d images are already captioned", summary.n_resumed, len(sources))
        todo = _batches(sources, done_before, options.batch_size)
        workers = default_workers(device) if options.workers is None else options.workers
        log.info("Captioning %d images with %s on %s (%d workers, batches of %d, beam %d)",
                 sum(len(b) for b in todo), model_path, device, workers, options.batch_size, decoding.beam_size)
        summary.n_processed = _caption(sources, todo, model_path, data, decoding, options,
                                       state, metadata, workers, device, summary.n_resumed)
        sources_to_merge = ([output] if seed is not None else []) + state.chunks
        written = set(seed or ()).union(*(read_column(chunk, "path") for chunk in state.chunks))
        if not keep <= written:  # chunks removed behind our back: finishing now would drop images
            raise SatcliError(f"{len(keep - written)} images are missing from {state.directory} (was something "
                              "removed while satcli ran?); run the same command again to caption them", output)
        counts = merge_results(sources_to_merge, output, metadata, keep=keep)
        state.remove()
    finally:
        state.unlock()
    summary.errors = {kind: n for kind, n in counts.items() if kind != "rows"}
    summary.n_captioned = counts["rows"] - summary.n_errors
    summary.seconds = time.perf_counter() - started
    if shard[1] > 1:
        log.info("Wrote part %d of %d: %s. When every part is done: satcli merge -o %s",
                 shard[0], shard[1], output, options.output)
    return summary


def _count(summary: CaptionSummary, errors: list[str | None]) -> None:
    for error in errors:
        if error is not None:
            kind = error.split(":", 1)[0]
            summary.errors[kind] = summary.errors.get(kind, 0) + 1
    summary.n_captioned = len(errors) - summary.n_errors


def _previous_output(output: Path, fingerprint: dict[str, Any], overwrite: bool) -> list[str] | None:
    """The paths of an existing output made with the same model and options (None: start without it)."""
    if overwrite or not output.exists():
        return None
    try:
        previous = read_metadata(output).get("satcli.fingerprint")
    except SatcliError:
        raise SatcliError("exists and is not a satcli results file; use --overwrite to replace it or -o to "
                          "write elsewhere", output) from None
    if previous != fingerprint:
        raise SatcliError(f"was written with {_difference(previous, fingerprint)}; use --overwrite to replace "
                          "it or -o to write elsewhere", output)
    return read_column(output, "path")


def _batches(sources: list[ImageSource], done: set[str], batch_size: int) -> list[list[int]]:
    """Batches cut at fixed positions of the sorted list, minus the images done: a resumed run sees the same
    batches as an uninterrupted one, so it computes bit-identical captions."""
    batches = []
    for start in range(0, len(sources), batch_size):
        batch = [i for i in range(start, min(start + batch_size, len(sources))) if sources[i].path not in done]
        if batch:
            batches.append(batch)
    return batches


def _caption(sources: list[ImageSource], batches: list[list[int]], model_path: Path, data: DataConfig,
             decoding: DecodingOptions, options: CaptionOptions, state: RunState, metadata: dict[str, Any],
             workers: int, device: torch.device, n_done: int) -> int:
    """Run the pipeline over ``batches``; returns how many images were processed."""
    if not batches:
        return 0
    decode_device = jpeg_decode_device(device)
    dataset = ImageFiles([s.file for s in sources], data, options.max_pixels, decode_device is not None)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        worker_init_fn=_lower_priority if device.type == "cpu" else None)
    progress = make_progress()
    progress.disable = not options.progress
    n_processed = 0
    iterator = iter(loader)  # the workers start decoding now, while the model is built
    loaded = load_captioner(model_path, device)
    model = prepare_model(loaded.model, device)
    with progress:
        task = progress.add_task("captioning", total=len(sources), completed=n_done, unit="images")
        writer = ChunkWriter(state, metadata, loaded.vocab.words)
        try:
            for batch in iterator:
                writer.reserve()  # a slow disk holds the device back instead of letting results pile up unsaved
                results: list[DecodingResult | None] = [None] * len(batch.indices)
                images = batch.images
                if batch.jpegs:
                    images = images_on_device(batch, data, decode_device or device, dataset.load)
                if images.shape[0]:
                    decoded = iter(caption_batch(model, images, loaded.preprocessing, decoding))
                    results = [next(decoded) if ok else None for ok in batch.loaded]
                writer.put(_Done([sources[i].path for i in batch.indices], batch.widths, batch.heights,
                                 batch.errors, results))
                n_processed += len(batch.indices)
                progress.advance(task, len(batch.indices))
        except BaseException as error:
            del iterator  # stops the workers
            with contextlib.suppress(Exception):
                writer.close()  # what was captioned is kept
            if isinstance(error, KeyboardInterrupt):
                log.warning("Interrupted: %d images are kept in %s; run the same command again to continue",
                            n_done + writer.n_written, state.directory)
            raise
        writer.close()
    return n_processed


def _fingerprint(checkpoint: dict[str, Any], model_sha256: str, decoding: DecodingOptions,
                 options: CaptionOptions) -> dict[str, Any]:
    """Everything that changes what a row holds: a run may only resume or extend results with the same."""
    pre = checkpoint["preprocessing"]
    return {
        "model_sha256": model_sha256,
        "beam_size": decoding.beam_size,
        "max_length": decoding.max_length,
        "length_penalty": decoding.length_penalty,
        "n_best": decoding.n_best,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
        "min_length": decoding.min_length,
        "banned_ids": list(decoding.banned_ids),
        "image_size": int(pre["image_size"]),
        "mean": [float(v) for v in pre["mean"]],
        "std": [float(v) for v in pre["std"]],
        "max_pixels": options.max_pixels,
    }


def _metadata(checkpoint: dict[str, Any], model_path: Path, decoding: DecodingOptions, options: CaptionOptions,
              shard: tuple[int, int], fingerprint: dict[str, Any]) -> dict[str, Any]:
    config = checkpoint["config"]
    return {
        "satcli.version": __version__,
        "satcli.model": {
            "path": str(model_path.absolute()),
            "sha256": fingerprint["model_sha256"],
            "encoder": config.get("encoder"),
            "vocab_size": config.get("vocab_size"),
            "config": config,
            "preprocessing": {key: fingerprint[key] for key in ("image_size", "mean", "std")},
            "train_options": checkpoint.get("train_options", {}),
            "metrics": checkpoint.get("metrics", {}),
        },
        "satcli.decoding": {"beam_size": decoding.beam_size, "max_length": decoding.max_length,
                            "length_penalty": decoding.length_penalty, "n_best": decoding.n_best,
                            "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
                            "min_length": decoding.min_length, "banned_ids": list(decoding.banned_ids)},
        # root: where the relative result paths start, so report and overlays find the images from anywhere.
        "satcli.images": {"max_pixels": options.max_pixels,
                          "root": os.path.abspath(options.root if options.root is not None else os.getcwd())},
        "satcli.shard": {"index": shard[0], "count": shard[1]},
        "satcli.fingerprint": fingerprint,
    }
