"""What a checkpoint holds, for people: ``satcli info CKPT`` and the model card ``train`` writes beside it.

Read from the validated checkpoint dict (:func:`satcli.formats.checkpoint.read_checkpoint`) without building
the network: the encoder's grid comes from its spec, the parameter count from the stored tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.captioner import CaptionerConfig
from models.encoders import ENCODERS
from satcli.core.atomic import write_text
from satcli.core.version import __version__
from satcli.formats.checkpoint import checkpoint_sha256, read_checkpoint


@dataclass
class ModelInfo:
    """Everything ``satcli info`` shows (``to_dict`` is its ``--json``)."""

    path: str
    sha256: str
    n_bytes: int
    satcli_version: str  # the satcli that wrote the checkpoint
    format_version: int
    encoder: str
    attention: str
    image_size: int
    grid: tuple[int, int]  # the feature grid the decoder attends over (rows, columns)
    feature_dim: int
    embed_dim: int
    attention_dim: int
    decoder_dim: int
    vocab_size: int
    n_parameters: int
    preprocessing: dict[str, Any]
    dataset: str | None
    train_options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reading_satcli_version: str = __version__  # the satcli reading it now

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["grid"] = list(self.grid)
        return values

    def best_scores(self) -> dict[str, float]:
        """The validation scores of the checkpoint's epoch (0–1): its ``val_*`` metrics, names without the prefix."""
        return {key[4:]: float(value) for key, value in self.metrics.items() if key.startswith("val_")
                and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}


def model_info(path: str | Path) -> ModelInfo:
    """Describe the checkpoint at ``path`` (refused in one line, like every load, when it is not one)."""
    path = Path(path)
    payload = read_checkpoint(path)
    config = CaptionerConfig.from_dict(payload["config"])
    spec = ENCODERS[config.encoder]
    size = int(config.image_size or spec.image_size)
    grid = (config.grid_size, config.grid_size) if config.grid_size else spec.grid_shape(size, size)
    n_parameters = sum(t.numel() for t in payload["state_dict"].values() if getattr(t, "is_floating_point", bool)())
    train_options = dict(payload.get("train_options") or {})
    return ModelInfo(
        path=str(path), sha256=checkpoint_sha256(path), n_bytes=path.stat().st_size,
        satcli_version=str(payload.get("satcli_version", "unknown")), format_version=int(payload["format_version"]),
        encoder=config.encoder, attention=config.attention, image_size=size, grid=tuple(grid),  # type: ignore[arg-type]
        feature_dim=spec.dim, embed_dim=config.embed_dim, attention_dim=config.attention_dim,
        decoder_dim=config.decoder_dim, vocab_size=len(payload["vocab"]), n_parameters=int(n_parameters),
        preprocessing=dict(payload["preprocessing"]), dataset=train_options.get("dataset"),
        train_options=train_options, metrics=dict(payload.get("metrics") or {}),
    )


def model_card(info: ModelInfo) -> str:
    """A short README.md for a run folder: what the model is, what it scored, how to use it."""
    options = info.train_options
    scores = info.best_scores()
    lines = [
        f"# {Path(info.path).parent.name or 'satcli model'}: a Show, Attend and Tell captioner",
        "",
        f"Trained by satcli {info.satcli_version} on the dataset `{info.dataset}`"
        + (f" (data root `{options['data_root']}`)" if options.get("data_root") else "") + ".",
        "",
        "| | |", "|---|---|",
        f"| encoder | {info.encoder} ({info.image_size} px, a {info.grid[0]}×{info.grid[1]} grid of "
        f"{info.feature_dim} channels) |",
        f"| attention | {info.attention} |",
        f"| decoder | embedding {info.embed_dim}, attention {info.attention_dim}, LSTM {info.decoder_dim} |",
        f"| vocabulary | {info.vocab_size:,} words |",
        f"| parameters | {info.n_parameters:,} |",
        f"| preprocessing | {info.preprocessing.get('image_size')} px, {info.preprocessing.get('interpolation')} "
        f"resize, mean {info.preprocessing.get('mean')}, std {info.preprocessing.get('std')} |",
    ]
    if "epoch" in info.metrics:
        lines.append(f"| best epoch | {info.metrics['epoch']} |")
    lines += [f"| validation {name} | {100 * value:.1f} |" for name, value in scores.items()]
    lines += [
        "",
        "Use it:",
        "",
        "```",
        f"satcli caption photos/ --model {info.path} -o captions.parquet",
        f"satcli info {info.path}            # everything in this table, and the training options (--json)",
        f"satcli export {info.path} -o exported/   # safetensors + TorchScript, for serving without satcli",
        "```",
        "",
        "Training options (those not at satcli's defaults are what made this model):",
        "",
        "```",
        *(f"{key} = {value!r}" for key, value in sorted(options.items())),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, checkpoint: Path) -> Path:
    """``folder/README.md``: the model card of ``checkpoint`` (train writes it at the end of every run)."""
    return write_text(folder / "README.md", model_card(model_info(checkpoint)))
