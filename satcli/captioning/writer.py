"""The writer thread: captioned batches → rows → chunk files, behind a bounded queue, so the device never waits
for the disk (and, with a slow disk, waits rather than run further ahead)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from models.decoding import DecodingResult
from satcli.captioning.state import RunState
from satcli.core.errors import SatcliError
from satcli.formats.results import CaptionRow, result_row

# Batches between the start of their captioning and the end of their write: the one being written and the one on
# the device (or waiting for the writer). With a slow disk the device waits rather than run further ahead, so a
# kill loses at most these.
UNSAVED_BATCHES = 2


@dataclass
class CaptionedBatch:
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
        self._queue: queue.Queue[CaptionedBatch | None] = queue.Queue(maxsize=UNSAVED_BATCHES)
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

    def put(self, done: CaptionedBatch) -> None:
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

    def _rows(self, done: CaptionedBatch) -> list[CaptionRow]:
        return [result_row(path, result, self.words, self.n_best, width, height, error)
                for path, width, height, error, result in zip(done.paths, done.widths, done.heights, done.errors,
                                                               done.results, strict=True)]
