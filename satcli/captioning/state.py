"""The resume state of a caption run: chunk files in a sidecar folder next to the output.

Each batch of results is written as its own small Parquet file ("chunk"), atomically, into ``<output>.partial/``.
A rerun of the same command skips the images already in chunks; when every image is done the chunks are merged
into the output and the sidecar is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from satcli.captioning.fingerprint import difference
from satcli.captioning.shards import partial_dir
from satcli.core.atomic import disk_error, write_text
from satcli.core.errors import SatcliError
from satcli.core.version import __version__
from satcli.formats.results import CaptionRow, read_column, to_table, write_results

log = logging.getLogger(__name__)


class RunState:
    """The sidecar directory of an unfinished run: ``run.json``, ``lock`` and ``chunk-NNNNNN.parquet`` files."""

    def __init__(self, output: Path):
        self.output = output
        self.directory = partial_dir(output)
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
                raise SatcliError(f"an unfinished run for this output used {difference(previous, fingerprint)}; "
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
