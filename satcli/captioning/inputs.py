"""Which images a caption run takes: files, directories (walked recursively) and glob patterns → sorted sources."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from satcli.core.errors import SatcliError
from satcli.core.marks import is_own_picture
from satcli.data.images import is_image_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class ImageSource:
    """An input image: ``path`` as written to the results, ``file`` the absolute path to open."""

    path: str
    file: str


def find_images(inputs: Sequence[str], root: str | Path | None = None) -> list[ImageSource]:
    """Files, directories (recursive) and glob patterns → image files, sorted by their result path.

    Inside directories and glob matches, hidden names, non-image extensions and satcli's own outputs (pictures
    in the folders it marks, see :mod:`satcli.core.marks`; unfinished runs' ``.partial`` folders) are skipped, so
    outputs written inside an input folder are never captioned on the next run; a file named
    explicitly is taken whatever its name (it becomes an error row if it is no image). Directory symlinks are
    followed once (a loop is harmless). ``path`` is relative to ``root`` when the file lies under it (the
    current directory by default), else absolute; symlinks are not resolved, so paths read as the user wrote.
    """
    base = os.path.abspath(root if root is not None else os.getcwd())
    found: dict[str, ImageSource] = {}
    not_utf8: dict[str, str] = {}  # absolute path → path as shown, for names that are not UTF-8

    def add(file: str) -> None:
        absolute = os.path.abspath(file)
        relative = os.path.relpath(absolute, base)
        shown = absolute if relative == ".." or relative.startswith(".." + os.sep) else relative
        if utf8_name(shown):
            found.setdefault(shown, ImageSource(shown, absolute))
        else:
            not_utf8.setdefault(absolute, shown)

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
                    for file in ([] if _run_state(match) else _walk(match)):
                        add(file)
                elif (is_image_name(match) and not is_own_picture(*os.path.split(match))
                      and not _run_state(os.path.dirname(match))):
                    add(match)
        else:
            raise SatcliError("no such file or directory", pattern)
    _spell_not_utf8(not_utf8, found)
    return sorted(found.values())


def _spell_not_utf8(not_utf8: dict[str, str], found: dict[str, ImageSource]) -> None:
    """Add the files whose names are not UTF-8 under their ``\\xNN`` spelling (:func:`printable_path`); where a
    UTF-8 name (or another such file) already reads like that, under ``SPELLING (not UTF-8)``, ``(not UTF-8, 2)``…,
    so every file keeps a row. UTF-8 names keep their own spelling; the rest go in the order of their bytes."""
    for absolute, shown in sorted(not_utf8.items(), key=lambda item: os.fsencode(item[0])):
        spelling, n = printable_path(shown), 0
        while spelling in found:
            n += 1
            spelling = f"{printable_path(shown)} (not UTF-8{'' if n == 1 else f', {n}'})"
        found[spelling] = ImageSource(spelling, absolute)


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
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not _run_state(os.path.join(directory, d))]
        for name in filenames:
            if not name.startswith(".") and is_image_name(name) and not is_own_picture(directory, name):
                yield os.path.join(directory, name)


def _run_state(directory: str) -> bool:
    """An unfinished caption run's ``<output>.partial`` folder (satcli's state, never input)."""
    return directory.endswith(".partial") and any(os.path.lexists(os.path.join(directory, name))
                                                  for name in ("run.json", "lock"))


def _walk_error(error: OSError) -> None:
    log.warning("cannot read directory %s: %s", error.filename, error.strerror)
