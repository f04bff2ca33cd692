"""Parquet inputs, local or at a URL, read a row group at a time: image bytes (img2dataset's ``jpg`` binary
column, Hugging Face datasets' ``image: struct<bytes, path>``) or, with ``--column``, a column of paths/URLs.

Each row is a :class:`Sample` keyed by the file's ``key`` column (img2dataset), else ``__key__``, else its row
number; the row's other short scalar columns (``caption``, ``url``, ``width`` ...) are carried into ``meta``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from satcli.captioning.sources.remote import is_url, open_url, remote_error
from satcli.captioning.sources.sample import Sample
from satcli.core.errors import SatcliError, first_line

IMAGE_COLUMNS = ("jpg", "image", "png", "webp", "jpeg", "img", "image_bytes")
KEY_COLUMNS = ("key", "__key__")
BATCH_ROWS = 256


def image_column(schema: pa.Schema, column: str | None, url: str) -> str:
    """The column holding the images: ``column`` when given, else the first of :data:`IMAGE_COLUMNS` there."""
    if column is not None:
        if column not in schema.names:
            raise SatcliError(f"has no column {column!r} (it has: {', '.join(schema.names)})", url)
        return column
    for name in IMAGE_COLUMNS:
        if name in schema.names and _kind(schema.field(name).type) != "other":
            return name
    raise SatcliError(f"has no image column ({'/'.join(IMAGE_COLUMNS)} of bytes, or struct<bytes, path>); name the "
                      f"column with --column (it has: {', '.join(schema.names)})", url)


def _kind(kind: pa.DataType) -> str:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "paths"
    return "other"


def parquet_samples(url: str, shard: str, column: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> Iterator[Sample]:
    """The rows of the Parquet file at ``url`` as samples, in file order, a row group's worth at a time."""
    try:
        stream = open_url(url, storage_options) if is_url(url) else open(url, "rb")  # noqa: SIM115
    except OSError as error:
        raise SatcliError(f"cannot read the file ({error.strerror or error})", url) from error
    with stream:
        try:
            file = pq.ParquetFile(stream)
        except (pa.ArrowException, OSError) as error:
            raise SatcliError(f"not a readable Parquet file ({first_line(error)})", url) from error
        schema = file.schema_arrow
        name = image_column(schema, column, url)
        kind = _kind(schema.field(name).type)
        if kind == "other":
            raise SatcliError(f"column {name!r} holds {schema.field(name).type}, not image bytes or paths", url)
        key_column = next((k for k in KEY_COLUMNS if k in schema.names), None)
        carried = [f.name for f in schema if f.name not in (name, key_column) and _carried(f.type)]
        number = 0
        try:
            for batch in file.iter_batches(batch_size=BATCH_ROWS):
                table = batch.to_pydict()
                for i, value in enumerate(table[name]):
                    key = str(table[key_column][i]) if key_column else str(number)
                    meta = {c: table[c][i] for c in carried if table[c][i] is not None}
                    yield _sample(url, shard, kind, value, key, meta or None, storage_options)
                    number += 1
        except (pa.ArrowException, OSError) as error:
            raise SatcliError(f"cannot read row {number} on ({first_line(error)})", url) from error
        except SatcliError:
            raise
        except Exception as error:
            raise remote_error(error, url) from error


def _carried(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind))


def _sample(url: str, shard: str, kind: str, value: Any, key: str, meta: dict[str, Any] | None,
            storage_options: Mapping[str, Any] | None) -> Sample:
    if kind == "paths":
        if value is None:
            return Sample(f"{url}#{key}", key=key, shard=shard, meta=meta, error="no-image: the path is empty")
        return Sample(value, file=value, key=key, shard=shard, meta=meta,
                      storage_options=storage_options if is_url(value) else None)
    data = value.get("bytes") if kind == "struct" and value is not None else value
    if not data:
        where = value.get("path") if kind == "struct" and value else None
        return Sample(f"{url}#{key}", key=key, shard=shard, meta=meta,
                      error="no-image: the row holds no image bytes" + (f" (path {where})" if where else ""))
    return Sample(f"{url}#{key}", data=bytes(data), key=key, shard=shard, meta=meta)
