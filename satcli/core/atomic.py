"""Atomic file writes: a temporary file in the target's folder, flushed to disk, then renamed over the target.

A kill or power loss at any moment leaves the old file or the new one, never a torn one. A kill can leave the
temporary file behind; its name, ``.NAME.satcli-PID-RANDOM.tmp``, says which target and which process it
belongs to, so :func:`remove_stale_temps` can delete those of dead processes (and nothing else) on the next run.

A write that fails for lack of space or permission (ENOSPC, EROFS, EACCES, ...) removes its temporary file,
leaves the target as it was, and raises :class:`~satcli.core.errors.SatcliError` naming the target and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from satcli.core.errors import SatcliError, first_line

log = logging.getLogger(__name__)

_TEMP = re.compile(r"^\.(?P<name>.+)\.satcli-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_path(target: str | Path) -> Path:
    """A fresh temporary name next to ``target``: ``.NAME.satcli-PID-RANDOM.tmp`` (hidden, same file system)."""
    target = Path(target)
    return target.with_name(f".{target.name}.satcli-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def disk_error(error: OSError, path: str | Path | None, doing: str = "cannot write") -> SatcliError:
    """A one-line SatcliError for a failed write: ``PATH: cannot write (No space left on device, ENOSPC)``."""
    code = errno.errorcode.get(error.errno or 0)
    if error.errno:  # the system's words: pyarrow's own text wraps them in its details
        reason = os.strerror(error.errno)
    else:
        reason = error.strerror or first_line(error)
    return SatcliError(f"{doing} ({reason}{', ' + code if code else ''})", path)


def make_folder(folder: str | Path, in_the_way: str) -> Path:
    """Create ``folder`` (and its parents) unless it is there; a file in its place is refused with ``in_the_way``,
    a failed mkdir with :func:`disk_error`'s one line."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SatcliError(in_the_way, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise disk_error(error, folder, "cannot create the folder") from error
    return folder


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s new content to; on success it is synced and renamed over
    ``target``. On any exception the temporary file is removed and ``target`` is left untouched; an OSError
    becomes a SatcliError naming ``target`` and the cause."""
    target = Path(target)
    tmp = temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _install(tmp, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise disk_error(error, target) from error
        raise


def move_into_place(source: str | Path, target: str | Path) -> Path:
    """Sync ``source`` (a finished file on ``target``'s file system, e.g. in a temporary folder beside it) to disk
    and rename it over ``target``. An OSError becomes a SatcliError naming ``target`` and the cause; ``source``
    is then left where it was, for its owner to remove."""
    target = Path(target)
    try:
        _install(Path(source), target)
    except OSError as error:
        raise disk_error(error, target) from error
    return target


def _install(source: Path, target: Path) -> None:
    _fsync_file(source)
    os.replace(source, target)
    fsync_directory(target.parent)


def write_with(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Atomically write ``target`` by calling ``write(temporary_path)`` (e.g. ``lambda p: torch.save(x, p)``)."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def write_bytes(target: str | Path, data: bytes) -> Path:
    """Atomically replace ``target``'s content with ``data``."""
    return write_with(target, lambda tmp: tmp.write_bytes(data))


def write_text(target: str | Path, text: str) -> Path:
    """Atomically replace ``target``'s content with ``text`` (UTF-8)."""
    return write_bytes(target, text.encode("utf-8"))


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete the temporary files that writes of ``target`` left behind when their process was killed.

    Only names of this module's pattern for this very target are considered, and only those whose writing
    process no longer runs; a live writer's temporary file is left alone. Returns the files removed.
    """
    target = Path(target)
    removed = []
    try:
        candidates = list(target.parent.glob(f".{glob_escape(target.name)}.satcli-*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        match = _TEMP.match(candidate.name)
        if match is None or match["name"] != target.name or process_alive(int(match["pid"])):
            continue
        try:
            candidate.unlink()
        except OSError as error:
            log.warning("cannot remove the stale temporary file %s: %s", candidate, error.strerror)
            continue
        log.info("removed %s, left by an interrupted write", candidate)
        removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this one included): the rule by which a temporary file or folder
    named after its writer's PID is that of a live writer, left alone, or of a killed one, removable."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened or synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
