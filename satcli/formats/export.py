"""``satcli export``: a trained captioner as files a server can use without satcli.

The folder holds

- ``model.safetensors``: the weights (the checkpoint's state dict, the same key names);
- ``config.json``: the model config, the preprocessing, the grid, the special token ids, the source checkpoint's
  SHA-256, and how each TorchScript file is called;
- ``vocab.json``: the words, in id order;
- ``encoder.pt``, ``start.pt``, ``step.pt``: TorchScript (``torch.jit.load``, no satcli, no Python source):
  the image encoder (uint8 pixels in, features out, normalisation included), the per-image start of decoding
  (attention keys and the LSTM's first state) and one decoding step (next-word log-probabilities, new state,
  attention);
- ``caption.py``: a 60-line greedy captioner on those files (torch and Pillow only): the loop a server starts from.

Captions from these files equal satcli's own (tests/test_export.py): the traced modules are the model's own
layers, run on the same preprocessed pixels.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from models.captioner import Captioner, Memory, State
from models.data import normalise
from satcli.core.atomic import make_folder, write_text, write_with
from satcli.core.version import __version__
from satcli.data.features import encode_images
from satcli.data.vocab import UNK_ID
from satcli.formats.checkpoint import LoadedCheckpoint

FORMAT = "satcli-export"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "config.json", "vocab.json", "encoder.pt", "start.pt", "step.pt", "caption.py")


class _Encode(nn.Module):
    """uint8 (B, 3, S, S) pixels → features (B, L, D): normalisation, then the encoder as satcli runs it
    (:func:`satcli.data.features.encode_images`: channels-last, features rounded to float16 as the cache keeps
    them), so the exported features are satcli's own."""

    def __init__(self, model: Captioner, preprocessing):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        return encode_images(self.model, (pixels.float() / 255.0 - self.mean) / self.std)


class _Start(nn.Module):
    """features (B, L, D) → attention keys (B, L, A), h (B, 1, H), c (B, 1, H)."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        memory = self.model.prepare(features)
        state = self.model.init_state(memory, 1)
        return memory.keys, state.h, state.c


class _Step(nn.Module):
    """tokens (B, K), h, c (B, K, H), features (B, L, D), keys (B, L, A) → logprobs (B, K, V), h, c, alpha (B, K, L)."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor, features: Tensor,
                keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logprobs, state, alpha = self.model.step(tokens, State(h, c), Memory(features, keys))
        return logprobs, state.h, state.c, alpha


@dataclass
class ExportResult:
    folder: Path
    files: tuple[Path, ...]


def export_model(loaded: LoadedCheckpoint, folder: Path, sha256: str) -> ExportResult:
    """Write the export of ``loaded`` (whose checkpoint file had ``sha256``) into ``folder``."""
    from safetensors.torch import save_file

    model = loaded.model.cpu().eval()
    folder = make_folder(folder, "a file is in the way of the export folder")
    size = loaded.preprocessing.image_size
    pixels = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    # TorchScript, not torch.export: the encoder's CPU chunking branches on the batch size, which torch.export
    # would fix to the example's; tracing keeps the batch and beam sizes free. torch marks torch.jit deprecated
    # (FutureWarning) and warns about the traced branch (TracerWarning): neither concerns the export's user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        features = encode_images(model, normalise(pixels, loaded.preprocessing))
        memory = model.prepare(features)
        state = model.init_state(memory, 3)
        tokens = torch.full((2, 3), model.config.start_id, dtype=torch.long)
        traced = {
            "encoder.pt": torch.jit.trace(_Encode(model, loaded.preprocessing), (pixels,), check_trace=False),
            "start.pt": torch.jit.trace(_Start(model), (features,), check_trace=False),
            "step.pt": torch.jit.trace(_Step(model), (tokens, state.h, state.c, features, memory.keys),
                                       check_trace=False),
        }
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_with(folder / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    for name, module in traced.items():
        write_with(folder / name, lambda tmp, module=module: _save_traced(module, tmp))
    write_text(folder / "vocab.json", json.dumps(loaded.vocab.to_list(), ensure_ascii=False))
    write_text(folder / "config.json", json.dumps(export_config(loaded, sha256), indent=2))
    script = resources.files("satcli").joinpath("export_assets/caption.py").read_text(encoding="utf-8")
    write_text(folder / "caption.py", script)
    return ExportResult(folder, tuple(folder / name for name in FILES))


def _save_traced(module: torch.jit.ScriptModule, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(path))


def export_config(loaded: LoadedCheckpoint, sha256: str) -> dict:
    """config.json: what the files are and how to feed them."""
    model = loaded.model
    config = model.config
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "satcli_version": __version__,
        "source_sha256": sha256,
        "model": config.to_dict(),
        "preprocessing": {**loaded.preprocessing.to_dict(),
                          "how": "RGB, EXIF orientation applied; JPEGs may be decoded at 1/2-1/8 scale not below "
                                 "image_size (Pillow draft mode); resized to image_size x image_size with "
                                 "`interpolation` (Pillow, antialiased); encoder.pt normalises with mean/std"},
        "grid": list(model.grid_shape), "feature_dim": model.encoder.spec.dim,
        "tokens": {"pad": config.pad_id, "start": config.start_id, "end": config.end_id, "unk": UNK_ID},
        "files": {
            "encoder.pt": "pixels uint8 (B, 3, S, S) -> features float32 (B, L, D)",
            "start.pt": "features (B, L, D) -> keys (B, L, A), h (B, 1, H), c (B, 1, H)",
            "step.pt": "tokens int64 (B, K), h (B, K, H), c (B, K, H), features (B, L, D), keys (B, L, A) -> "
                       "logprobs (B, K, V), h, c, alpha (B, K, L)",
            "model.safetensors": "the state dict of satcli's Captioner (models/captioner.py)",
        },
        "decoding": {"satcli_default_beam_size": 3, "max_length": 50, "banned": ["<unk>"]},
    }
