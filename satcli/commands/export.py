"""``satcli export CKPT -o DIR``: the model as safetensors weights, JSON config and vocabulary, and TorchScript
encoder, start and step modules with a greedy captioner script, for serving without satcli
(:mod:`satcli.formats.export` says what each file is)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from satcli.core.errors import SatcliError
from satcli.formats.checkpoint import checkpoint_sha256, load_captioner
from satcli.formats.export import ExportResult, export_model


@dataclass(frozen=True)
class ExportOptions:
    model: Path
    out: Path


def run(options: ExportOptions) -> ExportResult:
    """Load the checkpoint, then write the export folder (each file atomically)."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise SatcliError("satcli export needs safetensors: pip install 'satcli[export]'") from None
    sha256 = checkpoint_sha256(options.model)
    loaded = load_captioner(options.model)
    if loaded.model.config.coverage:
        raise SatcliError("the export's start and step files carry the LSTM state only, not coverage attention's "
                          "running sum of attention: this model (trained with --coverage) cannot be exported yet",
                          options.model)
    return export_model(loaded, options.out, sha256)
