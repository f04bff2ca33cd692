"""WebDataset tar shards (as img2dataset writes them), local or at a URL, read as a stream: one :class:`Sample`
per ``__key__``, never the whole shard in memory.

A sample is the run of consecutive members sharing a key (the member name up to the first dot of its last
part: ``000123.jpg``, ``000123.json``, ``000123.txt``). Its image is the ``.jpg``, ``.jpeg``, ``.png`` or
``.webp`` member; ``.json`` (parsed) and ``.txt`` are carried into ``meta``. A sample without an image member,
or whose member cannot be read, is an error row naming the shard and the member; a shard that ends early
(truncated) keeps the samples read and ends with one ``truncated-shard`` row saying where it stopped.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

from satcli.captioning.sources.remote import is_url, open_url, remote_error
from satcli.captioning.sources.sample import Sample
from satcli.core.errors import SatcliError

log = logging.getLogger(__name__)

IMAGE_MEMBERS = (".jpg", ".jpeg", ".png", ".webp")
CARRIED_MEMBERS = (".json", ".txt")


def split_member(name: str) -> tuple[str, str]:
    """``dir/000123.seg.jpg`` → (``dir/000123``, ``.seg.jpg``): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + extension).lower()


def tar_samples(url: str, shard: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Sample]:
    """The samples of the tar shard at ``url`` (a local path or a URL), in the order they are stored."""
    try:
        stream = open_url(url, storage_options) if is_url(url) else open(url, "rb")  # noqa: SIM115
    except OSError as error:
        raise SatcliError(f"cannot read the shard ({error.strerror or error})", url) from error
    with stream:
        yield from _samples(stream, url, shard)


def _samples(stream: Any, url: str, shard: str) -> Iterator[Sample]:
    key: str | None = None
    members: dict[str, bytes | str] = {}  # extension → bytes, or an error text for a member that was unreadable
    n_samples = 0
    where = "its start"
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # a stream: members are read in order, once
            for member in archive:
                where = f"member {member.name} (byte {member.offset:,})"
                if not member.isfile():
                    continue
                member_key, extension = split_member(member.name)
                if member_key != key and key is not None:
                    yield _sample(url, shard, key, members)
                    n_samples += 1
                    members = {}
                key = member_key
                if extension in IMAGE_MEMBERS or extension in CARRIED_MEMBERS:
                    try:
                        members[extension] = _read_member(archive, member)
                    except (tarfile.TarError, EOFError, OSError) as error:
                        members[extension] = f"truncated: the shard ends inside this member ({error})"
                        raise
                where = f"the end of member {member.name} (byte {member.offset_data + member.size:,})"
    except (tarfile.TarError, EOFError, OSError) as error:
        if key is not None and members:
            yield _sample(url, shard, key, members)
        yield _stopped(url, shard, n_samples, where, error)
        return
    except Exception as error:
        raise remote_error(error, url) from error
    if key is not None:
        yield _sample(url, shard, key, members)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | str:
    extracted = archive.extractfile(member)
    if extracted is None:
        return "unreadable: the member is not a regular file"
    data = extracted.read()
    if len(data) != member.size:
        return f"truncated: the member has {len(data):,} of its {member.size:,} bytes"
    return data


def _sample(url: str, shard: str, key: str, members: dict[str, bytes | str]) -> Sample:
    meta: dict[str, Any] = {}
    for extension in CARRIED_MEMBERS:
        value = members.get(extension)
        if isinstance(value, bytes):
            text = value.decode("utf-8", "replace")
            meta[extension[1:]] = _json_or_text(text) if extension == ".json" else text
    image = next((e for e in IMAGE_MEMBERS if e in members), None)
    if image is None:
        present = ", ".join(sorted(members)) or "no members satcli reads"
        return Sample(f"{url}#{key}", key=key, shard=shard, meta=meta or None,
                      error=f"no-image: sample {key} of {shard} has no .jpg/.jpeg/.png/.webp member ({present})")
    data = members[image]
    path = f"{url}#{key}{image}"
    if isinstance(data, str):
        kind, _, reason = data.partition(": ")
        return Sample(path, key=key, shard=shard, meta=meta or None,
                      error=f"{kind}: member {key}{image} of {shard}: {reason}")
    return Sample(path, data=data, key=key, shard=shard, meta=meta or None)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _stopped(url: str, shard: str, n_samples: int, where: str, error: BaseException) -> Sample:
    reason = str(error).strip() or type(error).__name__
    log.warning("%s: the shard stops at %s (%s); the %d complete samples before it are kept", url, where, reason,
                n_samples)
    return Sample(f"{url}#@end", shard=shard,
                  error=f"truncated-shard: {shard} stops at {where} after {n_samples} complete samples ({reason})")
