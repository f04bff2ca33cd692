import os

# Pin the terminal for rich so CLI output does not depend on the machine running the tests.
os.environ.setdefault("COLUMNS", "120")
os.environ["TERM"] = "dumb"
os.environ.setdefault("NO_COLOR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.s3 import s3_server  # noqa: E402, F401 — the session's S3 server on 127.0.0.1 (tests/s3.py)

# SATCLI_TEST_DEVICE=cuda: every tensor and module a test makes without naming a device lands there — the CUDA
# pass of the model and decoding tests in bench/gpu_check.py.
if os.environ.get("SATCLI_TEST_DEVICE"):
    torch.set_default_device(os.environ["SATCLI_TEST_DEVICE"])


def pytest_collection_modifyitems(config, items):
    if "engines" not in (config.option.markexpr or ""):  # Ray and Spark start slowly: make test-engines runs them
        skip_engines = pytest.mark.skip(reason="starts Ray or Spark: run with make test-engines (pytest -m engines)")
        for item in items:
            if "engines" in item.keywords:
                item.add_marker(skip_engines)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _loud_console():
    """``-q`` silences satcli's shared console for the rest of the process (one command per process); a test that
    runs ``satcli ... -q`` in-process must not silence the tests after it."""
    yield
    from satcli.core.console import set_quiet

    set_quiet(False)
