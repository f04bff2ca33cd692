"""``satcli caption SHARDS -o FOLDER --engine ray [--address ADDR] [--actors N]``: the Ray Data pipeline built for
the user, over tar or Parquet shards, local or in object storage.

satcli plans the run as ``satcli caption`` does over shards (:func:`satcli.captioning.sharded.plan_shards`: this
run's share of the shards, those whose results file is already complete skipped), then hands the shards left to
Ray Data: ``from_items(shards).map_batches(ShardCaptioner, batch_size=1, compute=ActorPoolStrategy(size=N))``.
Each actor loads the model once and captions a whole shard per call into that shard's results file
(:func:`satcli.captioning.sharded.caption_shard`, written atomically), so the input shard is the unit of work,
of retry and of resume. Ray places the actors (one GPU each when the cluster has GPUs, else one CPU each) and
retries the shard of an actor that dies; satcli schedules nothing itself. A rerun skips the finished shards.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from models.decoding import DecodingOptions
from satcli.captioning.model import prepare_model
from satcli.captioning.options import CaptionOptions, CaptionSummary, check_options, decoding_options
from satcli.captioning.sharded import OutputFolder, ShardRun, caption_shard, finish_summary, plan_shards
from satcli.captioning.shards import resolve_shard
from satcli.captioning.sources import Shard, find_inputs
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.engines import require
from satcli.engines.batches import batch_columns, set_threads
from satcli.formats.checkpoint import load_captioner

log = logging.getLogger(__name__)

RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")  # a traceback's last line


class ShardCaptioner:
    """A Ray actor's work in ``satcli caption --engine ray``: each call takes shards (``url``, ``kind``,
    ``column`` rows) and writes each one's results file; returns one row per shard with its counts."""

    def __init__(self, options: CaptionOptions, decoding: DecodingOptions, model_path: str,
                 metadata: dict[str, Any], seen: set[str], threads: int = 1):
        set_threads(threads)
        device = resolve_device(options.device)  # in the actor: the GPU Ray gave it, if any
        loaded = load_captioner(Path(model_path), device)
        loaded.model = prepare_model(loaded.model, device)
        folder = OutputFolder(options.output, options.storage_options)
        self.run = ShardRun(options, decoding, folder, loaded, Path(model_path), metadata, seen=seen)

    def __call__(self, batch: Any) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "rows": [], "errors": [], "duplicates": []}
        columns = batch_columns(batch)
        for url, kind, column in zip(columns["url"], columns["kind"], columns["column"], strict=True):
            shard = Shard(url, kind, column, self.run.options.storage_options or None)
            summary = CaptionSummary(self.run.options.output, 0)
            caption_shard(self.run, shard, summary)
            out["shard"].append(shard.name)
            out["rows"].append(summary.n_processed)
            out["errors"].append(json.dumps(summary.errors))
            out["duplicates"].append(summary.n_duplicates)
        return out


def connect(address: str | None) -> Any:
    """Ray, connected: to ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), to the cluster this process
    already joined, or else a local one on this machine."""
    ray = require("ray")
    require("ray.data")
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise SatcliError(f"cannot connect to the Ray cluster ({str(error).splitlines()[0]})",
                              address or "ray") from None
    return ray


def actor_resources(ray: Any, options: CaptionOptions, threads: int) -> tuple[int, dict[str, float]]:
    """How many actors, and each one's share: a GPU each when the cluster has GPUs (and --device allows), else
    ``threads`` CPUs each, as many as the cluster's CPUs hold."""
    cluster = ray.cluster_resources()
    n_gpus = int(cluster.get("GPU", 0))
    if n_gpus and options.device != "cpu":
        return options.actors or n_gpus, {"num_gpus": 1, "num_cpus": threads}
    return options.actors or max(1, int(cluster.get("CPU", 1)) // threads), {"num_cpus": threads}


def caption_with_ray(options: CaptionOptions, captioner: type = ShardCaptioner) -> CaptionSummary:
    """Caption the shards named by ``options.inputs`` on Ray (the module docstring tells how). ``captioner``: the
    actor class (a subclass of :class:`ShardCaptioner`)."""
    started = time.perf_counter()
    require("ray.data")  # before any work: without the extra, one line saying which to install
    check_options(options)
    decoding = decoding_options(options)
    shard = resolve_shard(options.shard)
    found = find_inputs(options.inputs, options.root, options.exclude, options.storage_options, options.column)
    if not found.shards:
        raise SatcliError("--engine ray captions tar or Parquet shards (one results file per shard, each shard a "
                          "unit of Ray's work and retry); name shards, or caption loose images without --engine")
    run = plan_shards(options, found, decoding, shard)
    folder = run.folder
    summary = CaptionSummary(folder.url if folder.remote else Path(folder.url), 0, shard=shard,
                             n_shards=len(run.shards), n_excluded=found.n_excluded,
                             n_shards_resumed=len(run.shards) - len(run.todo))
    if summary.n_shards_resumed:
        log.info("Resuming: %d of %d shards are already captioned", summary.n_shards_resumed, len(run.shards))
    if not run.todo:
        finish_summary(summary, started)
        return summary
    ray = connect(options.address)
    threads = 1
    n_actors, resources = actor_resources(ray, options, threads)
    n_actors = min(n_actors, len(run.todo))
    summary.device = f"ray: {n_actors} actors, " + ", ".join(f"{k.removeprefix('num_')} {v:g}"
                                                             for k, v in resources.items()) + " each"
    log.info("Captioning %d shards on Ray (%s) with %s into %s", len(run.todo), summary.device, run.model_path,
             folder.url)
    ray.data.DataContext.get_current().raise_original_map_exception = True  # an actor's SatcliError as raised
    items = [{"url": s.url, "kind": s.kind, "column": s.column} for s in run.todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        captioner, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n_actors),
        fn_constructor_kwargs={"options": options, "decoding": decoding, "model_path": str(run.model_path),
                               "metadata": run.metadata, "seen": run.seen, "threads": threads},
        **resources)
    failure = None
    try:
        for row in dataset.iter_rows():
            summary.n_processed += row["rows"]
            summary.n_duplicates += row["duplicates"]
            for kind, n in json.loads(row["errors"]).items():
                summary.errors[kind] = summary.errors.get(kind, 0) + n
    except Exception as error:  # Ray wraps what an actor raised; a user's mistake stays one line
        failure = stopped(error, folder.url)
    del dataset  # its actors hold CPUs or GPUs until the last reference goes, a traceback's included
    if failure is not None:
        raise failure
    finish_summary(summary, started)
    return summary


def stopped(error: BaseException, output: str) -> SatcliError:
    """A Ray job's failure → one line: an actor's own SatcliError (an unreachable URL ...) as it was, anything
    else with its last line, and that the finished shards are kept for the rerun."""
    seen: BaseException | None = error
    for _ in range(8):  # Ray's wrappers: RayTaskError.cause, UserCodeException.__cause__
        if isinstance(seen, SatcliError):
            return SatcliError(str(seen))  # afresh: the original's traceback holds Ray's executor
        if seen is None:
            break
        seen = getattr(seen, "cause", None) or seen.__cause__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    marker = f"{SatcliError.__module__}.{SatcliError.__name__}: "
    ours = [line[len(marker):] for line in lines if line.startswith(marker)]
    if ours:  # the actor's own one-line error, as text when Ray could not hand the exception over
        return SatcliError(ours[-1])
    raised = [line for line in lines if RAISED.match(line) and not line.startswith("ray.")]  # the actor's own
    reason = raised[-1] if raised else type(error).__name__
    return SatcliError(f"the Ray job stopped ({reason}); the shards finished so far are kept: run the same command "
                       "again to caption the rest", output)
