"""Injected faults for tests/test_engines.py, importable by Ray actors and Spark workers (which run in other
processes): the first attempt at a chosen piece of work kills its process with ``os._exit(1)``, as a node
losing power would; a marker file in ``$SATCLI_TEST_FAULTS`` remembers that the kill happened."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from satcli.engines.batches import batch_columns
from satcli.engines.ray import SatcliCaptioner
from satcli.engines.ray_job import ShardCaptioner
from satcli.engines.spark import caption_arrow

VICTIM_KEY = "000010001"  # a sample of the second shard
VICTIM_SHARD = "00001.tar"
LAST_SHARD = "00002.tar"


def kill_once(what: str) -> None:
    """``os._exit(1)`` the first time this is called for ``what`` (across processes), nothing after."""
    marker = Path(os.environ["SATCLI_TEST_FAULTS"]) / f"killed-{what}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    os._exit(1)


class DyingCaptioner(SatcliCaptioner):
    """Dies on its first batch holding the victim key."""

    def __call__(self, batch):
        if VICTIM_KEY in batch_columns(batch)["key"]:
            kill_once(f"batch-{VICTIM_KEY}")
        return super().__call__(batch)


class DyingShardCaptioner(ShardCaptioner):
    """Dies on its first attempt at the victim shard."""

    def __call__(self, batch):
        if any(url.endswith(VICTIM_SHARD) for url in batch_columns(batch)["url"]):
            kill_once(f"shard-{VICTIM_SHARD}")
        return super().__call__(batch)


class FailingShardCaptioner(ShardCaptioner):
    """Fails at the last shard every time (a bug, not a lost node: Ray does not retry it). With one actor the
    shards come in order, so a stopped run leaves the first two finished and the last one not."""

    def __call__(self, batch):
        if any(url.endswith(LAST_SHARD) for url in batch_columns(batch)["url"]):
            raise RuntimeError("injected failure")
        return super().__call__(batch)


def dying_caption_arrow(model: str, **options):
    """:func:`satcli.engines.spark.caption_arrow` whose first task holding the victim key kills its worker."""
    inner = caption_arrow(model, **options)

    def caption_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        batches = list(batches)
        if any(VICTIM_KEY in batch.column("key").to_pylist() for batch in batches):
            kill_once(f"task-{VICTIM_KEY}")
        yield from inner(iter(batches))

    return caption_partition


if __name__ == "__main__":  # a run stopping at the victim shard: python -m tests.engine_faults SHARDS MODEL OUT
    import sys

    from satcli.captioning.options import CaptionOptions
    from satcli.core.errors import SatcliError
    from satcli.engines.ray_job import caption_with_ray

    try:
        caption_with_ray(CaptionOptions(inputs=(sys.argv[1],), model=Path(sys.argv[2]), output=sys.argv[3],
                                        batch_size=3, progress=False, actors=1), captioner=FailingShardCaptioner)
    except SatcliError as error:
        print(error)  # noqa: T201 — read by the test
        sys.exit(1)
