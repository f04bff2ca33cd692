"""satcli on the engines people already scale with: Ray Data and Spark schedule the work, satcli captions it.

- :mod:`satcli.engines.ray`: :class:`~satcli.engines.ray.SatcliCaptioner`, a callable class for Ray Data's
  ``ds.map_batches`` (one model per actor, loaded once), and :func:`~satcli.engines.ray_job.caption_with_ray`,
  the ``satcli caption ... --engine ray`` run (one results file per input shard, a shard per actor call);
- :mod:`satcli.engines.spark`: :func:`~satcli.engines.spark.caption_arrow` for ``df.mapInArrow`` (the full
  results schema) and :func:`~satcli.engines.spark.caption_udf`, a ``predict_batch_udf`` factory;
- :mod:`satcli.engines.batches`: what both share: an engine's batch (numpy dict, pandas or pyarrow) → satcli
  samples → satcli's own results table, through the one decode-and-caption path
  (:func:`satcli.captioning.samples.caption_samples`), so the rows equal ``satcli caption``'s.

Ray and pyspark are optional extras (``satcli[ray]``, ``satcli[spark]``), imported only when an engine is used:
core satcli never needs them. docs/scale.md has the recipes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from satcli.core.errors import SatcliError

EXTRAS = {"ray": "ray", "pyspark": "spark"}


def require(module: str) -> ModuleType:
    """Import an engine (``ray``, ``ray.data``, ``pyspark.sql`` ...), or one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".", 1)[0]
        extra = EXTRAS.get(top, top)
        raise SatcliError(f"this needs {top}, which is not installed: pip install 'satcli[{extra}]'") from None
