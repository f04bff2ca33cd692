"""Spark: caption a DataFrame of image bytes or paths on the executors, with satcli's own model, preprocessing and
beam search, as ``satcli caption`` would.

The whole results schema, through ``mapInArrow`` (one model per Python worker, loaded once, kept across tasks)::

    from satcli.engines.spark import caption_arrow, results_schema

    images = spark.read.parquet("s3a://bucket/laion-part/")             # img2dataset's jpg + key columns
    captions = images.select("key", "jpg").mapInArrow(caption_arrow("/models/best.pt", beam_size=3),
                                                      results_schema())
    captions.write.parquet("s3a://bucket/captions/")

A few columns beside the others, through a ``predict_batch_udf`` (Spark ML's batched inference)::

    from satcli.engines.spark import caption_udf

    caption = caption_udf("/models/best.pt", batch_size=32)
    images.withColumn("satcli", caption("jpg")).select("key", "satcli.caption", "satcli.error")

Both give one row per input row; a picture that cannot be read is a row with ``error`` set, never a failed task.
The captions, words and attention equal ``satcli caption``'s for the same images, model and options. A task
whose worker dies is retried by Spark (``spark.task.maxFailures``); satcli schedules nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from satcli.engines import require
from satcli.engines.batches import BatchCaptioner
from satcli.formats.results import SCHEMA

# The columns the predict_batch_udf returns (a struct). Scalars only: predict_batch_udf takes lists only of one
# fixed length, so the words and the attention come through caption_arrow (the whole results schema).
UDF_COLUMNS = ("caption", "sum_logprob", "image_width", "image_height", "error")

_WORKER_CAPTIONERS: dict[tuple, BatchCaptioner] = {}  # one per Python worker and settings, kept across tasks


def results_schema() -> Any:
    """satcli's results schema (docs/formats.md) as a Spark ``StructType``: the schema of ``mapInArrow``'s output."""
    types = require("pyspark.sql.pandas.types")
    return types.from_arrow_schema(SCHEMA.remove_metadata())


def worker_captioner(model: str | Path, options: dict[str, Any]) -> BatchCaptioner:
    """This Python worker's captioner for ``model`` and ``options``, loaded on first use."""
    key = (str(model), tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _WORKER_CAPTIONERS:
        _WORKER_CAPTIONERS[key] = BatchCaptioner(model, **options)
    return _WORKER_CAPTIONERS[key]


def caption_arrow(model: str | Path, **options: Any) -> Callable[[Iterator[pa.RecordBatch]],
                                                                  Iterator[pa.RecordBatch]]:
    """A function for ``df.mapInArrow(caption_arrow(CKPT, ...), results_schema())``.

    ``df``'s columns: the pictures (bytes, a struct of bytes and path, or paths/URLs) and optionally ``key``,
    ``path``, ``shard`` and scalar columns to carry along (:mod:`satcli.engines.batches`). ``options``: those of
    :class:`~satcli.engines.batches.BatchCaptioner` (``device``, ``batch_size``, ``threads``, ``column``, ...,
    and ``satcli caption``'s decoding options such as ``beam_size``).
    """
    model = str(model)

    def caption_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        captioner = worker_captioner(model, options)
        for batch in batches:
            yield from captioner.caption(batch).to_batches()

    return caption_partition


def udf_type() -> Any:
    """The Spark struct type :func:`caption_udf` returns (:data:`UDF_COLUMNS` of the results schema)."""
    types = require("pyspark.sql.pandas.types")
    return types.from_arrow_schema(pa.schema([SCHEMA.field(name) for name in UDF_COLUMNS]))


def caption_udf(model: str | Path, batch_size: int = 32, **options: Any) -> Any:
    """A ``pyspark.ml.functions.predict_batch_udf`` captioning a column of image bytes or paths into a struct of
    :data:`UDF_COLUMNS`: ``df.withColumn("satcli", caption_udf(CKPT)("jpg"))``. Spark cuts the column into
    batches of ``batch_size``; ``options`` are :class:`~satcli.engines.batches.BatchCaptioner`'s."""
    functions = require("pyspark.ml.functions")
    model = str(model)

    def make_predict_fn() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        captioner = worker_captioner(model, {"batch_size": batch_size, **options})

        def predict(images: np.ndarray) -> dict[str, np.ndarray]:
            table = captioner.caption({"image": list(images)})
            # one column each (nulls kept: predict_batch_udf's row form refuses a first row that is an error)
            return {name: np.array(table.column(name).to_pylist(), dtype=object) for name in UDF_COLUMNS}

        return predict

    return functions.predict_batch_udf(make_predict_fn, return_type=udf_type(), batch_size=batch_size)
