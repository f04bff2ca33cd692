"""Ray Data: a callable class for ``ds.map_batches``, so a Ray pipeline captions with satcli's own model,
preprocessing and beam search.

    import ray
    from satcli.engines.ray import SatcliCaptioner

    ds = ray.data.read_parquet("s3://bucket/laion-part/")            # img2dataset's jpg + key columns
    captions = ds.map_batches(
        SatcliCaptioner,
        fn_constructor_kwargs={"model": "/models/best.pt", "beam_size": 3},
        batch_size=64, batch_format="pyarrow",                        # or "numpy", "pandas"
        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1,       # one model per actor, loaded once
    )
    captions.write_parquet("s3://bucket/captions/")

Each actor loads the checkpoint once (``__init__``); each call takes a batch of image bytes, paths/URLs or
decoded arrays (:mod:`satcli.engines.batches` says which columns it reads) and returns satcli's results schema
as a pyarrow Table (docs/formats.md): one row per input row, in order, the picture's ``key`` and ``shard``
kept. A picture that cannot be read is a row with ``error`` set, never a failed batch. The captions, words and
attention equal ``satcli caption``'s for the same images, model and options.

Ray retries the batch of an actor that dies (Ray Data restarts actors and retries their tasks by default);
satcli schedules nothing itself. ``satcli caption SHARDS --engine ray`` (:mod:`satcli.engines.ray_job`) builds
such a pipeline over tar or Parquet shards for users who would rather not write Python.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from satcli.engines.batches import BatchCaptioner


class SatcliCaptioner(BatchCaptioner):
    """``ds.map_batches(SatcliCaptioner, fn_constructor_kwargs={"model": CKPT, ...}, ...)``: one model per actor.

    Constructor arguments (``fn_constructor_kwargs``): ``model`` (a checkpoint path every node can read), and
    optionally ``device`` (``auto``: the actor's GPU when Ray gives it one), ``batch_size`` (images per forward
    pass, default 32), ``threads`` (torch threads per actor, default 1: give each actor ``num_cpus`` to match),
    ``column`` / ``key_column`` / ``path_column`` (the batch's columns, found by name by default),
    ``storage_options`` (fsspec options for URL paths, e.g. ``{"endpoint_url": ...}``), ``max_pixels``, and
    ``satcli caption``'s decoding options (``beam_size``, ``max_length``, ``length_penalty``, ``n_best``,
    ``no_repeat_ngram_size``, ``min_length``, ``allow_unk``).
    """

    def __call__(self, batch: Any) -> pa.Table:
        """A batch (numpy dict, pandas DataFrame or pyarrow Table) → satcli's results table, same rows, same order."""
        return self.caption(batch)
