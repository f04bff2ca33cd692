"""The one thing every source yields: a :class:`Sample` (a picture to caption and where it came from)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    """A picture to caption: exactly one of ``data`` (encoded image bytes), ``file`` (a local path or an fsspec
    URL, read when the sample is decoded) or ``image`` (a PIL image already in memory), unless ``error`` says
    why the source could not give one (the sample then becomes an error row).

    ``path`` is what the results' ``path`` column shows (a file as the user named it, a URL, or
    ``SHARD#MEMBER`` for a sample inside a tar or Parquet shard); ``key`` is the dataset's own key (WebDataset's
    ``__key__``, img2dataset's ``key`` column), ``shard`` the name of the input shard, ``meta`` what the source
    carries along (a WebDataset sample's ``.json`` and ``.txt``, a Parquet row's other columns), written to the
    ``source_meta`` column as JSON. ``storage_options`` open a ``file`` URL (fsspec keyword arguments).
    """

    path: str
    data: bytes | None = None
    file: str | None = None
    image: Any = None  # PIL.Image.Image
    key: str | None = None
    shard: str | None = None
    meta: Mapping[str, Any] | None = None
    error: str | None = None
    storage_options: Mapping[str, Any] | None = None

    @property
    def source_meta(self) -> str | None:
        """``meta`` as the JSON text of the ``source_meta`` column (None when there is none)."""
        if not self.meta:
            return None
        return json.dumps(self.meta, sort_keys=True, ensure_ascii=False, default=str)
