"""The caption run: find the images, load the checkpoint once, resume what is done, caption the rest in
batches through the workers, the device and the writer thread, then merge the chunks into the output (the
package's docstring tells the whole story)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from models.decoding import DecodingOptions, DecodingResult
from satcli.captioning.fingerprint import difference, load_run_model
from satcli.captioning.loading import ImageFiles, collate, lower_priority
from satcli.captioning.model import caption_batch, prepare_model
from satcli.captioning.options import (
    CaptionOptions,
    CaptionSummary,
    check_options,
    check_single_output,
    decoding_options,
)
from satcli.captioning.sharded import caption_shards
from satcli.captioning.shards import part_path, resolve_shard
from satcli.captioning.sources import find_inputs
from satcli.captioning.sources.local import ImageSource
from satcli.captioning.state import RunState
from satcli.captioning.writer import CaptionedBatch, ChunkWriter
from satcli.core.console import make_progress
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.data.feed import default_workers, images_on_device, jpeg_decode_device
from satcli.formats.checkpoint import LoadedCheckpoint
from satcli.formats.results import read_column, read_metadata, results_metadata
from satcli.formats.results_merge import merge_results

log = logging.getLogger(__name__)


def caption_images(options: CaptionOptions) -> CaptionSummary:
    """Caption every image named by ``options.inputs`` into ``options.output`` (or this shard's part)."""
    started = time.perf_counter()
    check_options(options)
    decoding = decoding_options(options)
    shard = resolve_shard(options.shard)
    found = find_inputs(options.inputs, options.root, options.exclude, options.storage_options, options.column)
    if found.shards:
        return caption_shards(options, found, decoding, shard, started)
    output = part_path(check_single_output(options.output), *shard)
    sources = found.images
    if not sources:
        skipped = f" ({sum(found.skipped.values()):,} other files skipped)" if found.skipped else ""
        raise SatcliError("no images found (JPEG, PNG, WebP, GIF, BMP or TIFF files) in " + " ".join(options.inputs)
                          + skipped)
    sources = sources[shard[0]::shard[1]]
    device = resolve_device(options.device)
    loaded, model_path, run_fingerprint = load_run_model(options.model, decoding, options.max_pixels)
    root = os.path.abspath(options.root if options.root is not None else os.getcwd())
    metadata = results_metadata(loaded, run_fingerprint["model_sha256"], decoding, image_root=root,
                                max_pixels=options.max_pixels, shard=shard, fingerprint=run_fingerprint)
    summary = CaptionSummary(output, len(sources), device=str(device), shard=shard, skipped=dict(found.skipped),
                             n_excluded=found.n_excluded)

    state = RunState(output)
    keep = {s.path for s in sources}
    seed = previous_output(output, run_fingerprint, options.overwrite)
    done_before = set(seed or ()) & keep
    state_existed = state.directory.exists() and not options.overwrite
    if not state_existed and seed is not None and len(done_before) == len(keep) == len(seed):
        summary.n_resumed = len(keep)
        _count(summary, read_column(output, "error"))
        summary.seconds = time.perf_counter() - started
        log.info("Nothing to do: all %d images are already in %s", len(keep), output)
        return summary
    try:
        done_before |= state.start(run_fingerprint, options.overwrite) & keep
        summary.n_resumed = len(done_before)
        if summary.n_resumed:
            log.info("Resuming: %d of %d images are already captioned", summary.n_resumed, len(sources))
        todo = batches(sources, done_before, options.batch_size)
        workers = default_workers(device) if options.workers is None else options.workers
        log.info("Captioning %d images with %s on %s (%d workers, batches of %d, beam %d)",
                 sum(len(b) for b in todo), model_path, device, workers, options.batch_size, decoding.beam_size)
        summary.n_processed = _caption(sources, todo, loaded, decoding, options, state, metadata, workers, device,
                                       summary.n_resumed)
        sources_to_merge = ([output] if seed is not None else []) + state.chunks
        written = set(seed or ()).union(*(read_column(chunk, "path") for chunk in state.chunks))
        if not keep <= written:  # chunks removed behind our back: finishing now would drop images
            raise SatcliError(f"{len(keep - written)} images are missing from {state.directory} (was something "
                              "removed while satcli ran?); run the same command again to caption them", output)
        counts = merge_results(sources_to_merge, output, metadata, keep=keep)
        state.remove()
    finally:
        state.unlock()
    summary.errors = {kind: n for kind, n in counts.items() if kind != "rows"}
    summary.n_captioned = counts["rows"] - summary.n_errors
    summary.seconds = time.perf_counter() - started
    if shard[1] > 1:
        log.info("Wrote part %d of %d: %s. When every part is done: satcli merge -o %s",
                 shard[0], shard[1], output, options.output)
    return summary


def _count(summary: CaptionSummary, errors: list[str | None]) -> None:
    for error in errors:
        if error is not None:
            kind = error.split(":", 1)[0]
            summary.errors[kind] = summary.errors.get(kind, 0) + 1
    summary.n_captioned = len(errors) - summary.n_errors


def previous_output(output: Path, run_fingerprint: dict[str, Any], overwrite: bool) -> list[str] | None:
    """The paths of an existing output made with the same model and options (None: start without it)."""
    if overwrite or not output.exists():
        return None
    try:
        previous = read_metadata(output).get("satcli.fingerprint")
    except SatcliError:
        raise SatcliError("exists and is not a satcli results file; use --overwrite to replace it or -o to "
                          "write elsewhere", output) from None
    if previous != run_fingerprint:
        raise SatcliError(f"was written with {difference(previous, run_fingerprint)}; use --overwrite to replace "
                          "it or -o to write elsewhere", output)
    return read_column(output, "path")


def batches(sources: list[ImageSource], done: set[str], batch_size: int) -> list[list[int]]:
    """Batches cut at fixed positions of the sorted list, minus the images done: a resumed run sees the same
    batches as an uninterrupted one, so it computes bit-identical captions."""
    cut = []
    for start in range(0, len(sources), batch_size):
        batch = [i for i in range(start, min(start + batch_size, len(sources))) if sources[i].path not in done]
        if batch:
            cut.append(batch)
    return cut


def _caption(sources: list[ImageSource], todo: list[list[int]], loaded: LoadedCheckpoint,
             decoding: DecodingOptions, options: CaptionOptions, state: RunState, metadata: dict[str, Any],
             workers: int, device: torch.device, n_done: int) -> int:
    """Run the pipeline over the batches ``todo``; returns how many images were processed."""
    if not todo:
        return 0
    data = loaded.preprocessing
    decode_device = jpeg_decode_device(device)
    dataset = ImageFiles([s.file for s in sources], data, options.max_pixels, decode_device is not None,
                         options.storage_options)
    loader = DataLoader(dataset, batch_sampler=todo, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        worker_init_fn=lower_priority if device.type == "cpu" else None)
    progress = make_progress()
    progress.disable = not options.progress
    n_processed = 0
    # On the device before the workers fork: a CPU copy of the weights would stay alive in them.
    model = prepare_model(loaded.model, device)
    iterator = iter(loader)  # the workers start decoding now
    with progress:
        task = progress.add_task("captioning", total=len(sources), completed=n_done, unit="images")
        writer = ChunkWriter(state, metadata, loaded.vocab.words)
        try:
            for batch in iterator:
                writer.reserve()  # a slow disk holds the device back instead of letting results pile up unsaved
                results: list[DecodingResult | None] = [None] * len(batch.indices)
                images = batch.images
                if batch.jpegs:
                    images = images_on_device(batch, data, decode_device or device, dataset.load)
                if images.shape[0]:
                    decoded = iter(caption_batch(model, images, loaded.preprocessing, decoding))
                    results = [next(decoded) if ok else None for ok in batch.loaded]
                writer.put(CaptionedBatch([sources[i].path for i in batch.indices], batch.widths, batch.heights,
                                          batch.errors, results))
                n_processed += len(batch.indices)
                progress.advance(task, len(batch.indices))
        except BaseException as error:
            del iterator  # stops the workers
            with contextlib.suppress(Exception):
                writer.close()  # what was captioned is kept
            if isinstance(error, KeyboardInterrupt):
                log.warning("Interrupted: %d images are kept in %s; run the same command again to continue",
                            n_done + writer.n_written, state.directory)
            raise
        writer.close()
    return n_processed
