"""Where the pictures come from: every source yields the same :class:`Sample` to the one decode-and-caption path
(:func:`satcli.captioning.samples.caption_samples`) that ``satcli caption``, the Python API and the engine
adapters share.

- ``local``: image files, folders (recursive) and glob patterns on this machine;
- ``remote``: URLs through fsspec (``s3://``, ``gs://``, ``hf://``, ``http(s)://``, ``file://``): a file, a
  prefix (listed recursively) or a glob; ``storage_options`` such as ``endpoint_url`` go to the filesystem;
- ``webdataset``: tar shards, local or remote, a sample per ``__key__`` with its ``.json``/``.txt`` carried;
- ``parquet``: Parquet files of image bytes (img2dataset's ``jpg``, Hugging Face's ``image`` struct) or of
  paths/URLs (``column``).

:func:`find_inputs` sorts what the user named into loose images (one results file, resumed by batches) and
shards (``.tar``/``.parquet`` files named explicitly, by a glob or by a brace pattern such as
``shards/{00000..00099}.tar``: one results file per shard, the shard the unit of work and resume). Everything
is streamed: a shard is read member by member (tar) or a row group at a time (Parquet).
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from satcli.captioning.sources.local import ImageSource, excluded, search_images
from satcli.captioning.sources.parquet import parquet_samples
from satcli.captioning.sources.remote import EXTRA, filesystem, is_url, list_url, remote_error
from satcli.captioning.sources.sample import Sample
from satcli.captioning.sources.webdataset import tar_samples
from satcli.core.errors import SatcliError
from satcli.data.images import is_image_name

__all__ = ["Inputs", "Sample", "Shard", "expand_braces", "find_inputs", "shard_kind"]

SHARD_KINDS = {".tar": "tar", ".parquet": "parquet"}


def shard_kind(name: str) -> str | None:
    """``tar`` or ``parquet`` for a shard's file name, None for anything else."""
    return SHARD_KINDS.get(posixpath.splitext(name.split("?", 1)[0])[1].lower())


@dataclass(frozen=True)
class Shard:
    """One input shard: ``url`` a local path or URL, ``name`` its file name (``00000.tar``)."""

    url: str
    kind: str  # tar | parquet
    column: str | None = None  # parquet: the column of images or paths (None: found by name)
    storage_options: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/").split("?", 1)[0])

    @property
    def output_name(self) -> str:
        """``00000.tar`` → ``00000.parquet``: the results file of this shard."""
        return posixpath.splitext(self.name)[0] + ".parquet"

    def samples(self) -> Iterator[Sample]:
        """The shard's samples, streamed in stored order."""
        if self.kind == "tar":
            return tar_samples(self.url, self.name, self.storage_options)
        return parquet_samples(self.url, self.name, self.column, self.storage_options)


@dataclass
class Inputs:
    """What a run takes: loose ``images`` (local files or URLs), or ``shards``; never both."""

    images: list[ImageSource] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # left out by extension: ".txt" → 3
    n_excluded: int = 0


def find_inputs(inputs: Sequence[str], root: str | os.PathLike | None = None, exclude: Sequence[str] = (),
                storage_options: Mapping[str, Any] | None = None, column: str | None = None) -> Inputs:
    """Sort the user's inputs into loose images and shards (the module docstring says how); one-line
    SatcliErrors for what is not there, unreachable, or mixed."""
    found = Inputs()
    local: list[str] = []
    url_images: dict[str, ImageSource] = {}
    for pattern in inputs:
        for item in expand_braces(pattern) if "{" in pattern and not os.path.lexists(pattern) else [pattern]:
            if is_url(item):
                _add_url(item, found, url_images, exclude, storage_options, column)
            elif shard_kind(item) and (glob.has_magic(item) or _is_file(item) or item != pattern):
                _add_local_shards(item, found, exclude, column)
            else:
                local.append(item)
    if local:
        images = search_images(local, root, exclude)
        found.images, found.skipped, found.n_excluded = images.sources, images.skipped, images.n_excluded
    found.images = sorted([*found.images, *url_images.values()])
    if found.images and found.shards:
        raise SatcliError("the inputs mix image files with tar/Parquet shards; caption them in separate runs "
                          "(shards write one results file each into an output folder)")
    names: dict[str, str] = {}
    for shard in found.shards:
        if names.setdefault(shard.output_name, shard.url) != shard.url:
            raise SatcliError(f"two input shards would write the same results file {shard.output_name}: "
                              f"{names[shard.output_name]} and {shard.url}; caption them in separate runs")
    return found


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00002}.tar`` → the three names (WebDataset's brace patterns, through ``braceexpand``)."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise SatcliError(f"brace patterns need the braceexpand package: {EXTRA}", pattern) from None
    try:
        return list(braceexpand(pattern))
    except Exception as error:  # an unbalanced or malformed brace
        raise SatcliError(f"not a brace pattern braceexpand reads ({error})", pattern) from None


def _add_local_shards(item: str, found: Inputs, exclude: Sequence[str], column: str | None) -> None:
    if glob.has_magic(item):
        matches = sorted(m for m in glob.glob(item, recursive=True) if _is_file(m))
        if not matches:
            raise SatcliError("the pattern matches no files", item)
    elif not _is_file(item):
        raise SatcliError("no such shard", item)
    else:
        matches = [item]
    for match in matches:
        if not excluded(match, exclude):
            found.shards.append(Shard(match, shard_kind(match) or "tar", column))


def _is_file(path: str) -> bool:
    """A file, or a pipe streaming one: anything there that is not a folder."""
    return os.path.exists(path) and not os.path.isdir(path)


def _add_url(url: str, found: Inputs, images: dict[str, ImageSource], exclude: Sequence[str],
             storage_options: Mapping[str, Any] | None, column: str | None) -> None:
    path = url.split("://", 1)[1]
    if shard_kind(url) and not glob.has_magic(path):
        _check_exists(url, storage_options)
        listed = [url]
    else:
        listed = list_url(url, storage_options)
    names_shards = glob.has_magic(path) or shard_kind(url)
    for item in listed:
        if excluded(item, exclude):
            found.n_excluded += 1
        elif shard_kind(item) and names_shards:
            found.shards.append(Shard(item, shard_kind(item) or "tar", column, storage_options))
        elif is_image_name(item.split("?", 1)[0]):
            images.setdefault(item, ImageSource(item, item))
        elif not posixpath.basename(item).startswith("."):
            found.skipped[posixpath.splitext(item)[1].lower()] += 1


def _check_exists(url: str, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        there = fs.isfile(path)
    except Exception as error:
        raise remote_error(error, url) from error
    if not there:
        parent = posixpath.dirname(path)
        try:
            fs.ls(parent)  # a missing bucket or no access says so here, rather than "no such shard"
        except Exception as error:
            raise remote_error(error, url) from error
        raise SatcliError("no such shard", url)
