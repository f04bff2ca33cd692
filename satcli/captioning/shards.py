"""Shards and their files: which share of the images a run takes, and every name a run's files get.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``) or with ``--shard K/N``, rank K captions every N-th image of the
sorted list, starting at the K-th, into ``captions.part-K-of-N.parquet``; :func:`merge_parts` joins the parts
into the single file an unsharded run would have written. An unfinished run keeps its chunks in
``<output>.partial/`` (:func:`partial_dir`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from satcli.core.errors import SatcliError
from satcli.formats.results import read_column, read_metadata
from satcli.formats.results_merge import merge_results

log = logging.getLogger(__name__)

PART = re.compile(r"^(?P<stem>.+)\.part-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]*)?$")


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


def _stem(output: Path) -> str:
    return output.name[: -len(output.suffix)] if output.suffix else output.name


def part_path(output: Path, index: int, count: int) -> Path:
    """``captions.parquet`` → ``captions.part-K-of-N.parquet`` (the part written by shard K of N)."""
    if count == 1:
        return output
    return output.with_name(f"{_stem(output)}.part-{index}-of-{count}{output.suffix or '.parquet'}")


def part_number(part: Path) -> tuple[int, int] | None:
    """``captions.part-K-of-N.parquet`` → (K, N); None for a name that is not a part's."""
    match = PART.match(part.name)
    return None if match is None else (int(match["index"]), int(match["count"]))


def partial_dir(output: Path) -> Path:
    """The sidecar folder an unfinished run of ``output`` (or of a part) keeps its chunks in."""
    return output.with_name(output.name + ".partial")


def find_parts(output: Path) -> list[Path]:
    """The part files written for ``output`` (``captions.parquet`` → ``captions.part-*-of-*.parquet``)."""
    return sorted(p for p in output.parent.glob(f"{_stem(output)}.part-*-of-*{output.suffix}")
                  if part_number(p) is not None)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through symlinks, hard links or ``..``)."""
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def complete_parts(parts: list[Path], output: Path) -> list[Path]:
    """``parts`` (empty: those found next to ``output``) in shard order, checked to be every part of one
    sharded run, each finished; raises SatcliError naming the first problem."""
    parts = parts or find_parts(output)
    if not parts:
        raise SatcliError("no parts to merge (looked for part-K-of-N files next to it)", output)
    numbered: dict[int, Path] = {}
    counts = set()
    for part in parts:
        number = part_number(part)
        if number is None:
            raise SatcliError("not a part file (its name should end in .part-K-of-N.parquet)", part)
        if not part.is_file():
            raise SatcliError("no such part file", part)
        if partial_dir(part).exists():
            raise SatcliError("this part is unfinished (its .partial directory is still there); rerun its shard "
                              "to finish it", part)
        index, count = number
        counts.add(count)
        if index in numbered:
            raise SatcliError(f"part {index} is given twice (also {numbered[index]})", part)
        numbered[index] = part
    if len(counts) != 1:
        raise SatcliError("the parts come from runs with different shard counts: " + ", ".join(map(str, parts)))
    count = counts.pop()
    missing = [i for i in range(count) if i not in numbered]
    if missing:
        raise SatcliError(f"part {missing[0]} of {count} is missing; finish that shard first (--shard "
                          f"{missing[0]}/{count})", output)
    ordered = [numbered[i] for i in range(count)]
    for part in ordered:  # merging into a part would replace it, and --remove-parts would then delete the result
        if _same_file(part, output):
            raise SatcliError("the output is one of the parts being merged; name another file with -o", output)
    return ordered


def merge_parts(parts: list[Path], output: Path, remove_parts: bool = False) -> dict[str, int]:
    """Check the parts are complete and from the same model and options, then merge them into ``output``.
    Returns counts: ``rows`` and rows per error kind.

    A merge killed while it removed the parts leaves the finished output and some parts: run again, it finds the
    output already holds every row of the parts left (same model and options), removes those with
    ``remove_parts`` and says so, instead of asking for the parts it had removed."""
    try:
        ordered = complete_parts(parts, output)
    except SatcliError:
        left = merged_already(parts, output)
        if left is None:
            raise
        log.info("%s already holds every part's rows (an earlier merge was stopped while it removed the parts)",
                 output)
        if remove_parts:
            for part in left:
                part.unlink(missing_ok=True)
        return _counts(output)
    fingerprints = {part: read_metadata(part).get("satcli.fingerprint") for part in ordered}
    first = ordered[0]
    for part in ordered[1:]:
        if fingerprints[part] != fingerprints[first]:
            raise SatcliError(f"made with a different model or options than {first}; such parts cannot be merged",
                              part)
    metadata = read_metadata(first)
    metadata.pop("satcli.schema_version", None)
    metadata["satcli.shard"] = {"index": 0, "count": 1, "merged_from": len(ordered)}
    counts = merge_results(ordered, output, metadata, on_duplicate="error")
    log.info("Merged %d parts into %s (%d rows)", len(ordered), output, counts["rows"])
    if remove_parts:
        for part in ordered:
            part.unlink()
    return counts


def merged_already(parts: list[Path], output: Path) -> list[Path] | None:
    """The parts still there when ``output`` is their finished merge (a merged file of the same model and
    options holding every row of each part left, none of them unfinished); None when it is not."""
    try:
        metadata = read_metadata(output) if output.is_file() else None
    except SatcliError:
        return None
    shard = (metadata or {}).get("satcli.shard")
    if not isinstance(shard, dict) or not isinstance(shard.get("merged_from"), int):
        return None
    left = [part for part in (parts or find_parts(output)) if part.is_file()]
    merged = None
    for part in left:
        number = part_number(part)
        if (number is None or number[1] != shard["merged_from"] or partial_dir(part).exists()
                or read_metadata(part).get("satcli.fingerprint") != metadata.get("satcli.fingerprint")):
            return None
        merged = set(read_column(output, "path")) if merged is None else merged
        if not set(read_column(part, "path")) <= merged:
            return None
    return left


def _counts(results: Path) -> dict[str, int]:
    counts = {"rows": 0}
    for error in read_column(results, "error"):
        counts["rows"] += 1
        if error is not None:
            kind = error.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
    return counts
