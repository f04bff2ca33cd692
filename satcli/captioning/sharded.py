"""Caption runs over tar or Parquet shards: the input shard is the unit of work and of resume.

Each input shard gets one results file in the output folder (local, or a URL such as ``s3://bucket/captions/``),
named after it (``00000.tar`` → ``00000.parquet``), written atomically (locally: a temporary file renamed over
it; in object storage: one upload, which appears whole or not at all) and carrying every sample's ``key`` and
``shard``. A rerun skips shards whose file is there (made with the same model and options: it is complete by
construction) and captions again the ones that are not, a killed run's half-done shard included. With
``skip_existing``, samples whose key is already in another results file of the folder are left out (dedup
against earlier outputs, e.g. after the shards were re-cut). ``--shard K/N`` takes every N-th input shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from models.decoding import DecodingOptions
from satcli.captioning.fingerprint import difference, load_run_model
from satcli.captioning.model import prepare_model
from satcli.captioning.options import CaptionOptions, CaptionSummary
from satcli.captioning.samples import caption_samples
from satcli.captioning.sources import Inputs, Sample, Shard
from satcli.captioning.sources.remote import filesystem, is_url, remote_error
from satcli.core.atomic import remove_stale_temps
from satcli.core.console import make_progress
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError, first_line
from satcli.formats.checkpoint import LoadedCheckpoint
from satcli.formats.results import ROW_GROUP_SIZE, CaptionRow, ResultsWriter, results_metadata, to_table

log = logging.getLogger(__name__)


class OutputFolder:
    """The folder of a sharded run's results files, on this machine or behind an fsspec URL."""

    def __init__(self, folder: Path | str, storage_options: Mapping[str, Any] | None):
        self.url = str(folder).rstrip("/") or "/"
        if self.url.endswith(".parquet"):
            raise SatcliError("with tar or Parquet shards as inputs, -o names a folder for one results file per "
                              "shard (e.g. -o captions/)", self.url)
        self.remote = is_url(self.url)
        self.fs, self.path = filesystem(self.url, storage_options) if self.remote else (None, self.url)
        if not self.remote and Path(self.url).exists() and not Path(self.url).is_dir():
            raise SatcliError("is a file; with shards as inputs, -o names a folder", self.url)
        bucket = self.path.split("/", 1)[0] if self.remote and "://" in self.url else ""
        if bucket and self.url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
            try:
                there = self.fs.exists(bucket)
            except Exception as error:
                raise remote_error(error, self.url) from error
            if not there:  # said now, not after the first shard is captioned
                raise SatcliError("no such bucket (create it first, or check the name)", self.url)

    def name(self, name: str) -> str:
        """The URL or local path of the results file ``name``."""
        return f"{self.url}/{name}"

    def results_files(self) -> set[str]:
        """The names of the ``.parquet`` files in the folder now."""
        try:
            if not self.remote:
                folder = Path(self.url)
                return {p.name for p in folder.glob("*.parquet")} if folder.is_dir() else set()
            if not self.fs.exists(self.path):
                return set()
            self.fs.invalidate_cache(self.path)
            return {posixpath.basename(p) for p in self.fs.ls(self.path, detail=False) if p.endswith(".parquet")}
        except Exception as error:
            raise remote_error(error, self.url) from error

    def read(self, name: str, columns: list[str] | None = None) -> tuple[dict[str, Any], dict[str, list]]:
        """A results file's satcli metadata (JSON text) and the ``columns`` asked for."""
        url = self.name(name)
        try:
            with contextlib.ExitStack() as stack:
                source = stack.enter_context(self.fs.open(f"{self.path}/{name}", "rb")) if self.remote else url
                file = pq.ParquetFile(source)
                metadata = {k.decode(): v.decode() for k, v in (file.schema_arrow.metadata or {}).items()}
                table = file.read(columns=columns) if columns else None
                return metadata, ({c: table.column(c).to_pylist() for c in columns} if table is not None else {})
        except Exception as error:
            raise SatcliError(f"not a readable results file ({first_line(error)}); delete it or use --overwrite",
                              url) from error

    def write(self, name: str, rows: Iterator[CaptionRow], metadata: dict[str, Any]) -> dict[str, int]:
        """Write ``rows`` as the results file ``name``, atomically; returns counts (``rows``, per error kind)."""
        if not self.remote:
            remove_stale_temps(self.name(name))
            return _write_rows(Path(self.name(name)), rows, metadata)
        with tempfile.TemporaryDirectory(prefix="satcli-shard-") as scratch:
            local = Path(scratch) / name
            counts = _write_rows(local, rows, metadata)
            try:
                self.fs.put_file(str(local), f"{self.path}/{name}")  # one object: there whole, or not at all
            except Exception as error:
                raise remote_error(error, self.name(name)) from error
        return counts


def _write_rows(path: Path, rows: Iterator[CaptionRow], metadata: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {"rows": 0}
    buffer: list[CaptionRow] = []
    with ResultsWriter(path, metadata) as writer:
        for row in rows:
            buffer.append(row)
            counts["rows"] += 1
            if row.error is not None:
                kind = row.error.split(":", 1)[0]
                counts[kind] = counts.get(kind, 0) + 1
            if len(buffer) == ROW_GROUP_SIZE:
                writer.write(to_table(buffer))
                buffer = []
        writer.write(to_table(buffer))
    return counts


@dataclass
class ShardRun:
    """A sharded run's plan, made once by :func:`plan_shards`: the model (loaded on the CPU), the metadata every
    results file carries, the output folder, this run's shards and those left to caption. An engine's worker
    rebuilds one around its own copy of the model (``satcli.engines.ray_job``)."""

    options: CaptionOptions
    decoding: DecodingOptions
    folder: OutputFolder
    loaded: LoadedCheckpoint
    model_path: Path
    metadata: dict[str, Any]
    shards: list[Shard] = field(default_factory=list)
    todo: list[Shard] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # --skip-existing: the keys of earlier results files


def plan_shards(options: CaptionOptions, found: Inputs, decoding: DecodingOptions,
                shard: tuple[int, int]) -> ShardRun:
    """This run's share of ``found.shards`` and which of them still need their results file."""
    if options.overlays is not None:
        raise SatcliError("--overlays draws over image files; with tar or Parquet shards as inputs the pictures are "
                          "inside the shards, so it is not available")
    shards = found.shards[shard[0]::shard[1]]
    folder = OutputFolder(options.output, options.storage_options)
    loaded, model_path, run_fingerprint = load_run_model(options.model, decoding, options.max_pixels)
    metadata = results_metadata(loaded, run_fingerprint["model_sha256"], decoding, image_root=None,
                                max_pixels=options.max_pixels, shard=shard, fingerprint=run_fingerprint)
    existing = folder.results_files()
    todo = [s for s in shards if not _complete(folder, s, existing, run_fingerprint, options.overwrite)]
    seen = _earlier_keys(folder, existing, {s.output_name for s in todo}) if options.skip_existing else set()
    return ShardRun(options, decoding, folder, loaded, model_path, metadata, shards, todo, seen)


def caption_shard(run: ShardRun, input_shard: Shard, summary: CaptionSummary,
                  advance: Callable[[], None] | None = None) -> None:
    """Caption one input shard into its results file (atomically) and add what it held to ``summary``."""
    options = run.options
    samples = _new_samples(input_shard.samples(), run.seen, summary) if options.skip_existing \
        else input_shard.samples()
    rows = caption_samples(run.loaded, samples, run.decoding, options.batch_size, max_pixels=options.max_pixels)
    counts = run.folder.write(input_shard.output_name, _advancing(rows, advance),
                              {**run.metadata, "satcli.source": {"shard": input_shard.url, "kind": input_shard.kind}})
    summary.n_processed += counts.pop("rows")
    for kind, n in counts.items():
        summary.errors[kind] = summary.errors.get(kind, 0) + n
    log.info("%s → %s", input_shard.url, run.folder.name(input_shard.output_name))


def caption_shards(options: CaptionOptions, found: Inputs, decoding: DecodingOptions, shard: tuple[int, int],
                   started: float) -> CaptionSummary:
    """Caption this run's share of ``found.shards`` into one results file each under ``options.output``."""
    run = plan_shards(options, found, decoding, shard)
    folder = run.folder
    summary = CaptionSummary(folder.url if folder.remote else Path(folder.url), 0, shard=shard,
                             n_shards=len(run.shards), n_excluded=found.n_excluded)
    summary.n_shards_resumed = len(run.shards) - len(run.todo)
    device = resolve_device(options.device)
    summary.device = str(device)
    if summary.n_shards_resumed:
        log.info("Resuming: %d of %d shards are already captioned", summary.n_shards_resumed, len(run.shards))
    if not run.todo:
        summary.seconds = time.perf_counter() - started
        return summary
    run.loaded.model = prepare_model(run.loaded.model, device)
    log.info("Captioning %d shards with %s on %s (batches of %d, beam %d) into %s", len(run.todo), run.model_path,
             device, options.batch_size, decoding.beam_size, folder.url)
    progress = make_progress()
    progress.disable = progress.disable or not options.progress
    with progress:
        task = progress.add_task("captioning", total=None, unit="images")
        for input_shard in run.todo:
            caption_shard(run, input_shard, summary, lambda: progress.advance(task))
    finish_summary(summary, started)
    return summary


def finish_summary(summary: CaptionSummary, started: float) -> None:
    """The totals of a sharded run's summary once its shards are done."""
    summary.n_images = summary.n_processed
    summary.n_captioned = summary.n_processed - summary.n_errors
    summary.seconds = time.perf_counter() - started


def _complete(folder: OutputFolder, shard: Shard, existing: set[str], run_fingerprint: dict[str, Any],
              overwrite: bool) -> bool:
    """Whether ``shard``'s results file is there, made with this model and these options."""
    if overwrite or shard.output_name not in existing:
        return False
    metadata, _ = folder.read(shard.output_name)
    try:
        previous = json.loads(metadata.get("satcli.fingerprint", "null"))
    except ValueError:
        previous = None
    if previous != run_fingerprint:
        raise SatcliError(f"was written with {difference(previous, run_fingerprint)}; use --overwrite to replace "
                          "it or -o to write elsewhere", folder.name(shard.output_name))
    return True


def _earlier_keys(folder: OutputFolder, existing: set[str], redone: set[str]) -> set[str]:
    keys: set[str] = set()
    for name in sorted(existing - redone):
        _, columns = folder.read(name, ["key"])
        keys.update(k for k in columns["key"] if k is not None)
    return keys


def _new_samples(samples: Iterator[Sample], seen: set[str], summary: CaptionSummary) -> Iterator[Sample]:
    for sample in samples:
        if sample.key is not None:
            if sample.key in seen:
                summary.n_duplicates += 1
                continue
            seen.add(sample.key)
        yield sample


def _advancing(rows: Iterator[CaptionRow], advance: Callable[[], None] | None) -> Iterator[CaptionRow]:
    for row in rows:
        if advance is not None:
            advance()
        yield row
