"""``satcli merge``: join the parts written by sharded caption runs into one results file.

``satcli caption --shard K/N`` (or rank K of a ``torchrun`` launch) writes ``captions.part-K-of-N.parquet``.
The parts are already one dataset (``pyarrow.dataset`` or duckdb read them with a glob); merging gives the
single file an unsharded run would have written: every image once, sorted by path, the same metadata.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from satcli.caption import DEFAULT_OUTPUT, CaptionSummary
from satcli.errors import SatcliError
from satcli.results import merge_results, read_metadata

log = logging.getLogger(__name__)

_PART = re.compile(r"^(?P<stem>.+)\.part-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]*)?$")


@dataclass(frozen=True)
class MergeOptions:
    """What ``satcli merge`` was asked to do."""

    parts: tuple[Path, ...] = ()  # empty: every ``<output stem>.part-K-of-N`` file next to the output
    output: Path = DEFAULT_OUTPUT
    remove_parts: bool = False


def find_parts(output: Path) -> list[Path]:
    """The part files written for ``output`` (``captions.parquet`` → ``captions.part-*-of-*.parquet``)."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return sorted(p for p in output.parent.glob(f"{stem}.part-*-of-*{output.suffix}") if _PART.match(p.name))


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through symlinks, hard links or ``..``)."""
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def run(options: MergeOptions) -> CaptionSummary:
    """Check the parts are complete and from the same model and options, then merge them into the output."""
    parts = list(options.parts) or find_parts(options.output)
    if not parts:
        raise SatcliError("no parts to merge (looked for part-K-of-N files next to it)", options.output)
    numbered: dict[int, Path] = {}
    counts = set()
    for part in parts:
        match = _PART.match(part.name)
        if not match:
            raise SatcliError("not a part file (its name should end in .part-K-of-N.parquet)", part)
        if not part.is_file():
            raise SatcliError("no such part file", part)
        if part.with_name(part.name + ".partial").exists():
            raise SatcliError("this part is unfinished (its .partial directory is still there); rerun its shard "
                              "to finish it", part)
        index, count = int(match["index"]), int(match["count"])
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
                          f"{missing[0]}/{count})", options.output)

    ordered = [numbered[i] for i in range(count)]
    for part in ordered:  # merging into a part would replace it, and --remove-parts would then delete the result
        if _same_file(part, options.output):
            raise SatcliError("the output is one of the parts being merged; name another file with -o",
                              options.output)
    fingerprints = {}
    for part in ordered:
        metadata = read_metadata(part)
        fingerprints[part] = metadata.get("satcli.fingerprint")
    first = ordered[0]
    for part in ordered[1:]:
        if fingerprints[part] != fingerprints[first]:
            raise SatcliError(f"made with a different model or options than {first}; such parts cannot be merged",
                              part)
    metadata = read_metadata(first)
    metadata.pop("satcli.schema_version", None)
    metadata["satcli.shard"] = {"index": 0, "count": 1, "merged_from": count}
    result = merge_results(ordered, options.output, metadata, on_duplicate="error")
    log.info("Merged %d parts into %s (%d rows)", count, options.output, result["rows"])
    if options.remove_parts:
        for part in ordered:
            part.unlink()
    errors = {kind: n for kind, n in result.items() if kind != "rows"}
    return CaptionSummary(options.output, result["rows"], n_captioned=result["rows"] - sum(errors.values()),
                          errors=errors)
