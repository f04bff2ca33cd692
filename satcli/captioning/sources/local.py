"""Local files: image files, directories (walked recursively) and glob patterns → sorted sources, with counts of
what was skipped (``--exclude`` patterns, files whose extension is not an image's)."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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


@dataclass
class FoundImages:
    """What a search found: ``sources`` sorted by result path; ``skipped`` counts the files left out inside
    folders and glob matches by their extension (``".txt": 3``; ``""`` for names without one), ``n_excluded``
    those an ``--exclude`` pattern matched."""

    sources: list[ImageSource]
    skipped: Counter[str] = field(default_factory=Counter)
    n_excluded: int = 0


def find_images(inputs: Sequence[str], root: str | Path | None = None,
                exclude: Sequence[str] = ()) -> list[ImageSource]:
    """Files, directories (recursive) and glob patterns → image files, sorted by their result path
    (:func:`search_images` without the counts)."""
    return search_images(inputs, root, exclude).sources


def search_images(inputs: Sequence[str], root: str | Path | None = None, exclude: Sequence[str] = ()) -> FoundImages:
    """Files, directories (recursive) and glob patterns → image files, sorted by their result path.

    Inside directories and glob matches, hidden names and non-image extensions are skipped (and counted), and so
    are satcli's own outputs (pictures in the folders it marks, see :mod:`satcli.core.marks`; unfinished runs'
    ``.partial`` folders), so outputs written inside an input folder are never captioned on the next run; a
    file named explicitly is taken whatever its name (it becomes an error row if it is no image). ``exclude``:
    glob patterns (``*.png``, ``raw/*``, ``**/thumbs/**``) matched against each file's result path and its name;
    a match is left out, even when named explicitly. Directory symlinks are followed once (a loop is harmless).
    ``path`` is relative to ``root`` when the file lies under it (the current directory by default), else
    absolute; symlinks are not resolved, so paths read as the user wrote.
    """
    base = os.path.abspath(root if root is not None else os.getcwd())
    found: dict[str, ImageSource] = {}
    not_utf8: dict[str, str] = {}  # absolute path → path as shown, for names that are not UTF-8
    result = FoundImages([])

    def add(file: str) -> None:
        absolute = os.path.abspath(file)
        relative = os.path.relpath(absolute, base)
        shown = absolute if relative == ".." or relative.startswith(".." + os.sep) else relative
        if excluded(printable_path(shown), exclude):
            result.n_excluded += printable_path(shown) not in found
            return
        if utf8_name(shown):
            found.setdefault(shown, ImageSource(shown, absolute))
        else:
            not_utf8.setdefault(absolute, shown)

    def walk(top: str) -> None:
        for file in _walk(top, result.skipped):
            add(file)

    for pattern in inputs:
        if os.path.isdir(pattern):
            walk(pattern)
        elif os.path.lexists(pattern):
            add(pattern)
        elif glob.has_magic(pattern):
            matches = glob.glob(pattern, recursive=True)
            if not matches:
                raise SatcliError("the pattern matches no files", pattern)
            for match in matches:
                if os.path.isdir(match):
                    if not _run_state(match):
                        walk(match)
                elif is_image_name(match):
                    if not is_own_picture(*os.path.split(match)) and not _run_state(os.path.dirname(match)):
                        add(match)
                elif not os.path.basename(match).startswith("."):
                    result.skipped[os.path.splitext(match)[1].lower()] += 1
        else:
            raise SatcliError("no such file or directory", pattern)
    _spell_not_utf8(not_utf8, found)
    result.sources = sorted(found.values())
    return result


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


def excluded(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` (or its last part) matches one of the ``--exclude`` glob ``patterns``."""
    name = path.replace(os.sep, "/").rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path.replace(os.sep, "/"), p) or fnmatch.fnmatchcase(name, p) for p in patterns)


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


def _walk(top: str, skipped: Counter[str]) -> Iterator[str]:
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
            if name.startswith("."):
                continue
            if is_image_name(name):
                if not is_own_picture(directory, name):
                    yield os.path.join(directory, name)
            else:
                skipped[os.path.splitext(name)[1].lower()] += 1


def _run_state(directory: str) -> bool:
    """An unfinished caption run's ``<output>.partial`` folder (satcli's state, never input)."""
    return directory.endswith(".partial") and any(os.path.lexists(os.path.join(directory, name))
                                                  for name in ("run.json", "lock"))


def _walk_error(error: OSError) -> None:
    log.warning("cannot read directory %s: %s", error.filename, error.strerror)
