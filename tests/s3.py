"""A real S3 server on 127.0.0.1 for the tests: moto's server mode on a free port, one per test session.

    def test_x(s3_server):  # tests/conftest.py makes the fixture available to every test
        bucket = s3_server.bucket()
        url = s3_server.put(f"{bucket}/a.tar", data)  # s3://...; read it with s3_server.options

``s3_server.options`` are the fsspec storage options (``endpoint_url`` and test credentials) that reach it,
``s3_server.cli_options`` the same as ``--storage-option`` arguments. Buckets are made with ``make_bucket``;
each test should use its own bucket name (``s3_server.bucket()`` makes a fresh one).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    fs: Any = None
    _count: Iterator[int] = field(default_factory=itertools.count)

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    @property
    def cli_options(self) -> list[str]:
        return [arg for k, v in self.options.items() for arg in ("--storage-option", f"{k}={v}")]

    def bucket(self, prefix: str = "test") -> str:
        """A new, empty bucket's name."""
        name = f"{prefix}-{next(self._count)}"
        self.fs.mkdir(name)
        return name

    def put(self, key: str, data: bytes) -> str:
        """Upload ``data`` to ``bucket/key``; returns its ``s3://`` URL."""
        self.fs.pipe_file(key, data)
        return self.url(key)

    def url(self, key: str) -> str:
        return f"s3://{key}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on 127.0.0.1 and a free port, for the whole session."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (in the dev extra)")
    s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs (the cloud extra)")
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would bury a failure's output
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True,
                               use_listings_cache=False)
        yield S3Server(endpoint, fs)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
