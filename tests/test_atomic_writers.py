"""Every file satcli rewrites goes through satcli.core.atomic: synced to disk before it replaces the old one, and a disk
that fails at that moment leaves the old file and one clear error naming the file (not a traceback, not a torn or
unsynced file). The failure is simulated where the helper syncs: ``os.fsync`` raising ENOSPC.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from satcli.core.defaults import STATE_ENV, remember_model
from satcli.core.errors import SatcliError
from satcli.core.steplog import StepLog
from satcli.data.features import cached_features
from satcli.data.store import StoredDataset
from tests.helpers import tiny_captioner
from tests.test_data_config import OneImageStore, blocky_picture
from tests.test_store import row, write_store


@pytest.fixture
def full_disk(monkeypatch):
    """From now on, syncing a file fails as on a full disk."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return lambda: monkeypatch.setattr(os, "fsync", fsync)


def test_the_remembered_model_is_replaced_atomically(tmp_path, monkeypatch, full_disk):
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state"))
    state = remember_model(tmp_path / "old.pt")
    full_disk()
    with pytest.raises(SatcliError, match="cannot write.*ENOSPC") as caught:
        remember_model(tmp_path / "new.pt")
    assert caught.value.path == state
    assert state.read_text().strip() == str(tmp_path / "old.pt")
    assert sorted(p.name for p in state.parent.iterdir()) == ["last-model"]  # no temporary file left


def test_a_resumed_step_log_is_trimmed_atomically(tmp_path, full_disk):
    lines = "".join(json.dumps({"epoch": e, "step": e, "loss": 1.0, "lr": {}}) + "\n" for e in (1, 2))
    (tmp_path / "steps.jsonl").write_text(lines)
    full_disk()
    with pytest.raises(SatcliError, match="cannot write.*ENOSPC"):
        StepLog(tmp_path, keep_epochs=1)
    assert (tmp_path / "steps.jsonl").read_text() == lines  # both epochs still there, not half a file


def test_the_feature_cache_is_written_atomically(tmp_path, full_disk):
    store = OneImageStore(blocky_picture(64, 64))
    store.root, store.name, store.meta = tmp_path / "toy", "toy", {"created": "now"}
    model = tiny_captioner(image_size=32)
    full_disk()
    with pytest.raises(SatcliError, match="cannot write.*ENOSPC") as caught:
        cached_features(store, "val", model, torch.device("cpu"))
    assert caught.value.path.name == "val.npy"
    assert list(caught.value.path.parent.iterdir()) == []  # neither a cache that looks finished nor a temp file


def test_a_store_is_committed_through_synced_files(tmp_path, full_disk):
    root = write_store(tmp_path / "toy", {"train": [row(1)], "test": [row(2)]})
    full_disk()
    with pytest.raises(SatcliError, match="cannot write.*ENOSPC"):
        write_store(root, {"train": [row(3)], "test": [row(4)]})
    with pytest.raises(SatcliError, match="incomplete preprocessed dataset"):
        StoredDataset.open(tmp_path, "toy")  # never a store that looks finished over unsynced files
    assert not [p for p in root.iterdir() if p.name.startswith(".partial-")]


def test_the_store_does_not_import_the_dataset_readers():
    # the store's "run satcli preprocess" hint once imported satcli.data.datasets for the names of dataset kinds
    code = "import sys, satcli.data.store; print('satcli.data.datasets' in sys.modules)"
    root = str(Path(__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.stdout.strip() == "False"
