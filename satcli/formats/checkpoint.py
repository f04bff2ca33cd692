"""Model checkpoints: one file holding a plain dict, loaded with ``torch.load(weights_only=True)``.

``{format, format_version, satcli_version, config, state_dict, vocab, preprocessing, train_options, metrics}``.
No pickled module or class is ever stored, so loading a checkpoint cannot execute code; a file that is not a
satcli checkpoint, or is truncated, is refused with a one-line error naming it.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.captioner import Captioner, CaptionerConfig
from models.data import DEFAULT_INTERPOLATION, INTERPOLATIONS, DataConfig
from satcli.core.atomic import remove_stale_temps, write_with
from satcli.core.errors import SatcliError, first_line
from satcli.core.version import __version__
from satcli.data.vocab import Vocabulary

FORMAT = "satcli-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    """A captioner with everything that travels with it."""

    model: Captioner
    vocab: Vocabulary
    preprocessing: DataConfig  # the checkpoint's "preprocessing": how its images must be prepared
    train_options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers, so stored keys never carry their prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def checkpoint_dict(model: Captioner, vocab: Vocabulary, train_options: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The dict a checkpoint file holds (plain types and tensors only). ``extra`` adds fields (e.g. optimiser)."""
    model = _unwrap(model)  # type: ignore[assignment]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "satcli_version": __version__,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab.to_list(),
        "preprocessing": DataConfig.for_config(model.config).to_dict(),
        "train_options": dict(train_options or {}),
        "metrics": dict(metrics or {}),
        **extra,
    }


def save_checkpoint(path: str | Path, model: Captioner, vocab: Vocabulary,
                    train_options: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                    **extra: Any) -> Path:
    """Write atomically (:mod:`satcli.core.atomic`): a temporary file in the same directory, flushed to disk, then
    renamed over ``path``. A crash at any moment leaves either the old file or the new one, never a torn one; a
    full disk or read-only folder leaves the old one and raises SatcliError naming ``path`` and the cause.
    """
    path = Path(path)
    payload = checkpoint_dict(model, vocab, train_options, metrics, **extra)
    remove_stale_temps(path)  # left by a run killed while writing this checkpoint
    return write_with(path, lambda tmp: _save(payload, tmp))


class _Sink:
    """A file for torch.save that remembers the OSError of a failed write: torch reports a full disk only as a
    RuntimeError ("unexpected pos"), which would hide the cause."""

    def __init__(self, file: Any):
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(payload: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as file:
        sink = _Sink(file)
        try:
            torch.save(payload, sink)  # type: ignore[arg-type]
        except RuntimeError as error:
            if sink.error is not None:
                raise sink.error from error
            raise


def read_checkpoint(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """The checkpoint dict, validated. Raises SatcliError for anything that is not a readable satcli checkpoint.
    ``data``: the file's bytes, read already (they are loaded instead of the file, which may have changed since)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise SatcliError("no such checkpoint file", path)
    try:
        payload = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses anything but tensors and plain containers, before running any of it.
        reason = first_line(error, 120, empty="unsupported content")
        raise SatcliError(f"not a satcli checkpoint: it holds objects satcli refuses to load ({reason})",
                          path) from error
    except Exception as error:  # torch raises many types for torn or foreign files; all mean the same here
        raise SatcliError("not a readable checkpoint: the file is truncated or corrupt", path) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SatcliError("not a satcli checkpoint (no satcli format marker)", path)
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SatcliError(f"checkpoint format {version} is newer than this satcli understands ({FORMAT_VERSION}); "
                          "upgrade satcli", path)
    missing = {"config", "state_dict", "vocab", "preprocessing"} - payload.keys()
    if missing:
        raise SatcliError(f"checkpoint is missing {', '.join(sorted(missing))}", path)
    problem = checkpoint_problem(payload)
    if problem:
        raise SatcliError(f"checkpoint holds {problem}", path)
    return payload


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048  # pixels a side: the paper uses 224-256; 60,000 would be a 10 GB resize
_MAX_WIDTH = 1 << 16  # embedding, attention and decoder sizes, vocabulary size: sanity bounds, far above use


def checkpoint_problem(payload: dict[str, Any]) -> str | None:
    """What is malformed in a checkpoint dict with the satcli marker (config, preprocessing, vocabulary, train
    options), as words for a one-line error; None when every value is usable. Values are never trusted: a
    checkpoint may come from anywhere."""
    config, pre = payload["config"], payload["preprocessing"]
    if not isinstance(config, dict):
        return "a config that is not a mapping"
    try:
        built = CaptionerConfig.from_dict(config)
    except Exception as error:  # noqa: BLE001 — any value the config's own checks reject
        return f"a malformed config ({first_line(error)})"
    bounds = {"vocab_size": (1, _MAX_WIDTH), "embed_dim": (1, _MAX_WIDTH), "attention_dim": (1, _MAX_WIDTH),
              "decoder_dim": (1, _MAX_WIDTH), "image_size": (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), "grid_size": (1, 256)}
    for name, (low, high) in bounds.items():
        value = getattr(built, name, None)
        if not (value is None and name == "grid_size") and not _integer(value, low, high):
            return f"a malformed config: {name} {_short(value)} is not a whole number from {low} to {high}"
    if not isinstance(pre, dict):
        return "preprocessing that is not a mapping"
    size = pre.get("image_size")
    if not _integer(size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE):
        return (f"a malformed preprocessing: image_size {_short(size)} is not a whole number from {MIN_IMAGE_SIZE} "
                f"to {MAX_IMAGE_SIZE}")
    for name in ("mean", "std"):
        values = pre.get(name)
        if (not isinstance(values, list | tuple) or len(values) != 3
                or not all(_number(v) for v in values) or (name == "std" and min(values) <= 0)):
            return f"a malformed preprocessing: {name} {_short(values)} is not three finite numbers" + (
                " above 0" if name == "std" else "")
    interpolation = pre.get("interpolation", DEFAULT_INTERPOLATION)
    if interpolation not in INTERPOLATIONS:
        return (f"a malformed preprocessing: interpolation {_short(interpolation)} is not one of "
                f"{', '.join(INTERPOLATIONS)}")
    vocab = payload["vocab"]
    if not isinstance(vocab, list | tuple) or not all(isinstance(word, str) for word in vocab):
        return "a vocabulary that is not a list of words"
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "a state dict that is not a mapping of names to tensors"
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return (f"weights that are not finite numbers (NaN or infinity in {_short(name)}): a model that "
                    "cannot caption; use one saved before its training diverged")
    for name in ("train_options", "metrics"):
        value = payload.get(name, {})
        if not isinstance(value, dict):
            return f"{name} that are not a mapping"
        if json_size(value, MAX_NOTES_CHARS) is None:
            return (f"{name} that are not plain values (numbers, words, lists, mappings) of at most "
                    f"{MAX_NOTES_CHARS:,} characters as JSON: they are copied into every results file")
    return None


# train_options and metrics travel into the metadata of every results file, chunk and report: satcli's own are
# under 2,000 characters as JSON. Anything else a checkpoint carries there (a list shared many times inside the
# pickle is small on disk and huge as JSON) would be copied into every chunk a caption run writes.
MAX_NOTES_CHARS = 16_384
_MAX_NOTES_DEPTH = 16


def json_size(value: Any, budget: int) -> int | None:
    """About how many characters ``value`` takes as JSON, or None when it holds anything but plain JSON values
    (str-keyed mappings, lists, strings, numbers, booleans, None), nests deeper than 16, or exceeds ``budget``.
    Stops as soon as the budget is spent: the work is bounded by ``budget``, not by the value."""
    size, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= _MAX_NOTES_DEPTH:
                return None
            size += 2 + 2 * len(item)
            if size > budget:
                return None
            if isinstance(item, dict):
                if not all(isinstance(key, str) for key in item):
                    return None
                size += sum(len(key) for key in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            size += len(item) + 2
        elif item is None or isinstance(item, bool | float):
            size += 24
        elif isinstance(item, int):
            size += 1 + item.bit_length() // 3
        else:
            return None  # a tensor, bytes, ...: not something a results file's JSON can hold
        if size > budget:
            return None
    return size


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    """A value for an error message, at most 40 characters (a 5000-digit integer has no ``repr`` at all)."""
    try:
        text = repr(value)
    except ValueError:
        return "(a huge number)"
    return text if len(text) <= 40 else text[:37] + "..."


def build_captioner(config: CaptionerConfig, state_dict: dict[str, torch.Tensor], path: str | Path | None,
                    **options: Any) -> Captioner:
    """``Captioner(config, **options)`` holding ``state_dict``; a one-line error naming ``path`` when they do not
    fit. The model is first built on PyTorch's meta device (shapes, no memory) and every tensor's shape compared
    with the state dict's, so a crafted config asking for a model larger than the tensors the file holds
    (vocabulary, embedding, attention, decoder sizes, grid) allocates nothing: only a model the size of the
    state dict already in memory is ever built."""
    problem = _shape_problem(config, state_dict, options)
    if problem:
        raise SatcliError(f"checkpoint does not describe a valid model: {problem}", path)
    model = Captioner(config, **options)
    model.load_state_dict(state_dict)
    return model


def _shape_problem(config: CaptionerConfig, state_dict: dict[str, torch.Tensor], options: dict[str, Any]
                   ) -> str | None:
    try:
        with torch.device("meta"):
            wanted = {name: tuple(t.shape) for name, t in Captioner(config, **options).state_dict().items()}
    except Exception as error:  # noqa: BLE001 — whatever sizes the layers themselves refuse
        return first_line(error)
    for name, shape in wanted.items():
        tensor = state_dict.get(name)
        if not isinstance(tensor, torch.Tensor):
            return f"its state dict has no {_short(name)}"
        if tuple(tensor.shape) != shape:
            return (f"its config asks for {name} of shape {_shape(shape)}, its state dict holds "
                    f"{_shape(tuple(tensor.shape))}")
    extra = sorted(set(state_dict) - set(wanted))
    return f"its state dict holds {_short(extra[0])}, which its config has no place for" if extra else None


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "()"


def load_captioner(path: str | Path, device: str | torch.device = "cpu", data: bytes | None = None) -> LoadedCheckpoint:
    """Rebuild the captioner stored at ``path`` (or in ``data``, its bytes read already) in eval mode on ``device``."""
    path = Path(path)
    payload = read_checkpoint(path, data)
    try:
        config = CaptionerConfig.from_dict(payload["config"])
        model = build_captioner(config, payload["state_dict"], path)
        vocab = Vocabulary(list(payload["vocab"]))
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise SatcliError(f"checkpoint does not describe a valid model: {first_line(error)}", path) from error
    if len(vocab) != config.vocab_size:
        raise SatcliError(f"checkpoint vocabulary has {len(vocab)} words but the model {config.vocab_size}", path)
    preprocessing = DataConfig.from_dict(payload["preprocessing"])
    return LoadedCheckpoint(model.to(device).eval(), vocab, preprocessing, dict(payload.get("train_options", {})),
                            dict(payload.get("metrics", {})), path)


def load_captioner_hashed(path: str | Path, device: str | torch.device = "cpu") -> tuple[LoadedCheckpoint, str]:
    """The captioner and the SHA-256 of the very bytes it was built from: the file is read once, so a checkpoint
    replaced meanwhile can never give a model and a hash of two different files."""
    path = Path(path)
    if not path.is_file():
        raise SatcliError("no such checkpoint file", path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SatcliError(f"cannot read the checkpoint ({error.strerror or first_line(error)})", path) from error
    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps with unpickling the tensors
        sha256 = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        loaded = load_captioner(path, device, data)
        return loaded, sha256.result()


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint file, read in 1 MiB blocks: recorded in results so a run can tell its model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
