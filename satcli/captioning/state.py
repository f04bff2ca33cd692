"""The resume state of a caption run: chunk files in a sidecar folder next to the output.

Each batch of results is written as its own small Parquet file ("chunk"), atomically, into ``<output>.partial/``.
A rerun of the same command skips the images already in chunks; when every image is done the chunks are merged
into the output and the sidecar is removed.

Nothing is opened, truncated or deleted through a link here: the sidecar must be a real folder, satcli's names in
it (``lock``, ``run.json``, chunks) must be regular files, and deletes go through the folder's own descriptor.
The lock is :mod:`filelock`'s ``flock`` (opened without following links, closed in forked DataLoader workers so a
killed run's workers never block its rerun). A finishing run deletes its lock file while it still holds it, and a
run that then locks a deleted file (``nlink`` 0) tries again, so two live runs can never hold different files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from satcli.captioning.fingerprint import difference
from satcli.captioning.shards import partial_dir
from satcli.core.atomic import disk_error, write_text
from satcli.core.errors import SatcliError
from satcli.core.version import __version__
from satcli.formats.results import CaptionRow, read_column, to_table, write_results

log = logging.getLogger(__name__)

_ATTEMPTS = 5  # a lock file deleted by a run finishing at that instant, or its folder removed: open the new one
_DIR_FD = os.unlink in os.supports_dir_fd and os.open in os.supports_dir_fd  # POSIX; Windows uses paths


class RunState:
    """The sidecar directory of an unfinished run: ``run.json``, ``lock`` and ``chunk-NNNNNN.parquet`` files."""

    def __init__(self, output: Path):
        self.output = output
        self.directory = partial_dir(output)
        self._lock: FileLock | None = None
        self._held: tuple[int, int] | None = None  # (device, inode) of the lock file we hold
        self._folder: int | None = None  # descriptor of the sidecar while we hold its lock
        self._next = 0

    @property
    def chunks(self) -> list[Path]:
        return sorted(self.directory.glob("chunk-*.parquet"))

    def lock(self) -> None:
        """Take the sidecar's lock; another live process writing the same output is refused.

        The sidecar must be a real folder and its ``lock`` a regular file (or absent): a symbolic link (or a file)
        in either place is refused, so nothing is ever written, or deleted, through it.
        """
        for _ in range(_ATTEMPTS):
            self._check_folder()
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._folder = _open_folder(self.directory)
                lock = FileLock(self.directory / "lock", timeout=0, on_acquired=self._check_lock_file)
                lock.acquire()
            except Timeout:  # held by another run, or a lock file deleted just now: look again
                self._close_folder()
                continue
            except FileNotFoundError:  # the folder was removed by a run that just finished
                self._close_folder()
                continue
            except OSError as error:
                self._close_folder()
                if error.errno in (errno.ELOOP, errno.EISDIR):  # a link (O_NOFOLLOW) or a folder named lock
                    raise _not_ours(self.directory / "lock") from None
                raise disk_error(error, self.directory, "cannot create the folder for the unfinished run") from error
            except BaseException:
                self._close_folder()
                raise
            self._lock = lock
            return
        raise SatcliError("another satcli caption is writing this output right now", self.output)

    def _check_folder(self) -> None:
        if self.directory.is_symlink() or (self.directory.exists() and not self.directory.is_dir()):
            raise SatcliError("is in the way of the folder satcli keeps an unfinished run in (it is a symbolic "
                              "link or a file, not a folder satcli made); move it away or write elsewhere with -o",
                              self.directory)

    def _check_lock_file(self, fd: int) -> None:
        """Run by filelock once the lock is ours: it must be the regular file named ``lock`` in our folder."""
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode):
            raise _not_ours(self.directory / "lock")
        try:
            named = _lstat(self.directory, "lock", self._folder)
        except FileNotFoundError:
            named = None
        if named is None or not os.path.samestat(held, named):
            raise SatcliError("changed while satcli took its lock; run the command again", self.directory / "lock")
        self._held = (held.st_dev, held.st_ino)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._close_folder()

    def _close_folder(self) -> None:
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None

    def start(self, fingerprint: dict[str, Any], overwrite: bool) -> set[str]:
        """Open (or start) the run and return the paths its chunks already hold."""
        self.lock()
        try:
            return self._start(fingerprint, overwrite)
        except BaseException:
            self.unlock()
            raise

    def _start(self, fingerprint: dict[str, Any], overwrite: bool) -> set[str]:
        for name in sorted(os.listdir(self.directory)):
            if _own(name) and name != "lock" and not _regular(self.directory, name, self._folder):
                raise _not_ours(self.directory / name)
        recorded = self.directory / "run.json"
        if overwrite:
            self._remove_own_files(keep_lock=True)
        if recorded.exists():
            try:
                previous = json.loads(recorded.read_text(encoding="utf-8"))["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                previous = None
            if previous != fingerprint:
                raise SatcliError(f"an unfinished run for this output used {difference(previous, fingerprint)}; "
                                  "run with --overwrite to start again, or with the same model and options to "
                                  "finish it", self.output)
        for stale in [*self.directory.glob(".chunk-*.tmp"), *self.directory.glob(".run.json.*.tmp")]:
            self._unlink(stale.name)  # temporary files of a chunk being written when killed (we hold the lock)
        if not recorded.exists():
            write_json_atomic(recorded, {"fingerprint": fingerprint, "satcli_version": __version__})
        done: set[str] = set()
        for chunk in self.chunks:
            try:
                done.update(read_column(chunk, "path"))
            except SatcliError:
                log.warning("%s is unreadable; its images will be captioned again", chunk)
                self._unlink(chunk.name)
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
        """Delete the sidecar: the files the run wrote, the lock file last and while still held (a run waiting
        on it then sees it deleted and takes a new one), then the folder if nothing else is in it."""
        if self._lock is not None:
            self._remove_own_files(keep_lock=True)
            with contextlib.suppress(OSError):  # Windows cannot delete an open file: filelock does on release
                named = _lstat(self.directory, "lock", self._folder)
                if (named.st_dev, named.st_ino) == self._held:
                    self._unlink("lock")
        self.unlock()
        try:
            self.directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            with contextlib.suppress(OSError):  # a run that started just now keeps the folder: not a stranger's
                if any(not _own(name) for name in os.listdir(self.directory)):
                    log.warning("%s holds files satcli did not write; it is left in place", self.directory)

    def _remove_own_files(self, keep_lock: bool) -> None:
        """Only what a run writes here: ``lock``, ``run.json``, chunks and their temporary files; never a
        folder, and links themselves rather than what they point to."""
        for name in os.listdir(self.directory):
            if _own(name) and not (keep_lock and name == "lock"):
                with contextlib.suppress(FileNotFoundError):
                    if not stat.S_ISDIR(_lstat(self.directory, name, self._folder).st_mode):
                        self._unlink(name)

    def _unlink(self, name: str) -> None:
        """Delete ``name`` in the sidecar (through the folder's descriptor while we hold it: if the path was
        swapped for a link meanwhile, nothing outside is touched)."""
        with contextlib.suppress(FileNotFoundError):
            if self._folder is not None and _DIR_FD:
                os.unlink(name, dir_fd=self._folder)
            else:
                (self.directory / name).unlink()


_CHUNK = re.compile(r"^chunk-\d+\.parquet$")


def _own(name: str) -> bool:
    """A name satcli gives the files of an unfinished run."""
    return bool(name in ("lock", "run.json") or _CHUNK.match(name)
                or (name.startswith((".chunk-", ".run.json.")) and name.endswith(".tmp")))


def _open_folder(directory: Path) -> int | None:
    if not _DIR_FD:
        return None
    return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))


def _lstat(directory: Path, name: str, folder: int | None) -> os.stat_result:
    if folder is not None:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    return os.lstat(directory / name)


def _regular(directory: Path, name: str, folder: int | None) -> bool:
    try:
        return stat.S_ISREG(_lstat(directory, name, folder).st_mode)
    except FileNotFoundError:
        return True  # gone meanwhile: nothing to open


def _not_ours(path: Path) -> SatcliError:
    return SatcliError("is a symbolic link or not a regular file, so not a file satcli wrote for this unfinished "
                       "run; nothing was read or written through it: move it away and run the command again", path)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True))
