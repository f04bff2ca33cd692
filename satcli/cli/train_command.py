"""``satcli train``: its options in panels (model, optimisation, augmentation, SCST, runtime, output), the
run-file switches (--config, --print-config, --dry-run), and the call of :mod:`satcli.commands.train`.
Registered on the app by :func:`register_train`, in workflow order."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import click
import typer

from satcli.cli.config import NOT_FROM_FILE, to_toml
from satcli.cli.options import (
    Attention,
    ConfigOption,
    DataRootOption,
    DeviceOption,
    DryRunOption,
    FeatureFlipsOption,
    FeatureShiftsOption,
    FeatureViewsOption,
    JsonOption,
    PrintConfigOption,
    QuietOption,
    ThreadsOption,
)
from satcli.cli.output import print_plan, print_trained

OutOption = Annotated[Path | None, typer.Option(
    "--out", file_okay=False, show_default=False, help="Run folder. Default: runs/<dataset>.")]
EncoderOption = Annotated[str, typer.Option(
    help="Image encoder (see `satcli encoders`).")]
AttentionOption = Annotated[Attention, typer.Option(
    help="soft: the expected context; hard: a sampled location, trained with REINFORCE (the paper's 4.1).")
    ]
ImageSizeOption = Annotated[int | None, typer.Option(
    min=32, show_default=False, help="Encoder input size. Default: the encoder's own.")]
GridSizeOption = Annotated[int | None, typer.Option(
    min=1, show_default=False, help="Pool the feature map to this many cells a side (the paper: 14).")]
DoublyStochasticOption = Annotated[float, typer.Option(
    min=0.0, help="λ of the attention regulariser λ·meanᵢ(1 − Σₜ αₜᵢ)², added to the per-token NLL "
    "(cross-entropy training; SCST optimises CIDEr-D alone).")]
LrDecayOption = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="Multiply learning rates by this when validation BLEU-4 stalls.")]
LrPatienceOption = Annotated[int, typer.Option(
    min=1, help="Epochs without validation improvement before the learning rates decay.")]
PatienceOption = Annotated[int, typer.Option(
    min=1, help="Stop after this many epochs without validation improvement.")]
ScheduledSamplingOption = Annotated[float, typer.Option(
    min=0.0, max=1.0, help="Probability of feeding the model its own previous word.")]
FineTuneEncoderOption = Annotated[bool, typer.Option(
    "--fine-tune-encoder", help="Train the encoder too, on augmented images.")]
FineTuneBlocksOption = Annotated[int, typer.Option(
    help="Encoder blocks to fine-tune from the top (-1: all, the stem included).")]
CoverageOption = Annotated[bool, typer.Option(
    "--coverage", help="Coverage attention: the attention also reads how much each cell was attended by the "
    "earlier words (See et al. 2017), so it can move on to the next object.")]
CoverageLossOption = Annotated[float, typer.Option(
    min=0.0, help="λ of the coverage loss: at each word, Σ_i min(α_i, attention so far on cell i), against "
    "looking at one object again (See et al. 2017; 0: off).")]
ScstOption = Annotated[bool, typer.Option(
    "--scst", help="Self-critical fine-tuning of --init with a CIDEr-D reward and the greedy caption as "
    "baseline (--out default: runs/<dataset>-scst; learning rate: --scst-lr).")]
InitOption = Annotated[Path | None, typer.Option(
    "--init", exists=True, dir_okay=False, show_default=False, help="With --scst: the checkpoint to start from.")
    ]
TensorboardOption = Annotated[bool, typer.Option(
    "--tensorboard", help="Also write TensorBoard event files to <out>/tensorboard (needs: pip install "
    "tensorboard).")]

# train --help shows its options in these panels, in this order (the rest: "Data and run folder")
PANELS = {
    "Model": ("encoder", "attention", "image_size", "grid_size", "embed_dim", "attention_dim", "decoder_dim",
              "dropout", "feature_dropout", "words_loss", "unlikelihood", "coverage", "coverage_loss",
              "doubly_stochastic"),
    "Optimisation": ("epochs", "batch_size", "decoder_lr", "encoder_lr", "grad_clip", "lr_decay", "lr_patience",
                     "patience", "scheduled_sampling", "val_beam_size", "fine_tune_encoder", "fine_tune_after",
                     "fine_tune_blocks"),
    "Augmentation": ("feature_flips", "feature_shifts", "feature_views"),
    "SCST": ("scst", "init", "scst_samples", "scst_lr"),
    "Runtime": ("device", "amp", "compile", "seed", "threads"),
    "Output": ("tensorboard", "config", "print_config", "dry_run", "as_json", "quiet"),
}
_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


class PanelledCommand(typer.core.TyperCommand):
    """A command whose options are shown in :data:`PANELS` by ``--help`` (the shared option types stay shared)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            param.rich_help_panel = _PANEL_OF.get(param.name or "", "Data and run folder")  # type: ignore[attr-defined]


def register_train(app: typer.Typer) -> None:
    app.command(cls=PanelledCommand)(train)


def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", help="A preprocessed dataset under the data root.")],
    data_root: DataRootOption = Path("data"),
    out: OutOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in --out.")] = False,
    encoder: EncoderOption = "efficientnet-lite0-stage6",
    attention: AttentionOption = Attention.soft,
    image_size: ImageSizeOption = None,
    grid_size: GridSizeOption = None,
    embed_dim: Annotated[int, typer.Option(min=1, help="Word embedding size.")] = 512,
    attention_dim: Annotated[int, typer.Option(min=1, help="Attention layer size.")] = 512,
    decoder_dim: Annotated[int, typer.Option(min=1, help="LSTM size.")] = 512,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="Dropout before the output layers.")] = 0.5,
    feature_dropout: Annotated[float, typer.Option(
        min=0.0, max=0.99, help="Drop each channel of a training picture's features, in all its cells alike "
        "(the decoder then reads an object from many channels).")] = 0.0,
    words_loss: Annotated[float, typer.Option(
        min=0.0, help="λ of a bag-of-words loss: a head on the mean feature learns which words the caption holds, "
        "and its probabilities start the LSTM (0: no head).")] = 0.0,
    unlikelihood: Annotated[float, typer.Option(
        min=0.0, help="α of a token-level unlikelihood loss: at each word, -log(1 - p) of the words the caption "
        "already wrote (Welleck et al. 2020), against naming one object twice (0: off).")] = 0.0,
    coverage: CoverageOption = False,
    coverage_loss: CoverageLossOption = 0.0,
    doubly_stochastic: DoublyStochasticOption = 1.0,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (one pass over every training caption).")] = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="Captions per step, over all processes.")] = 64,
    decoder_lr: Annotated[float, typer.Option(min=0.0, help="Decoder learning rate.")] = 4e-4,
    encoder_lr: Annotated[float, typer.Option(min=0.0, help="Encoder learning rate when fine-tuning.")] = 1e-4,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Clip gradients to this norm.")] = 5.0,
    lr_decay: LrDecayOption = 0.8,
    lr_patience: LrPatienceOption = 3,
    patience: PatienceOption = 10,
    scheduled_sampling: ScheduledSamplingOption = 0.0,
    fine_tune_encoder: FineTuneEncoderOption = False,
    fine_tune_after: Annotated[int, typer.Option(min=0, help="Start fine-tuning after this many epochs.")] = 0,
    fine_tune_blocks: FineTuneBlocksOption = 6,
    feature_flips: FeatureFlipsOption = False,
    feature_shifts: FeatureShiftsOption = False,
    feature_views: FeatureViewsOption = 0,
    val_beam_size: Annotated[int, typer.Option(min=1, help="Beam size of validation decoding.")] = 1,
    scst: ScstOption = False,
    init: InitOption = None,
    scst_samples: Annotated[int, typer.Option(min=1, help="With --scst: captions sampled per image.")] = 5,
    scst_lr: Annotated[float, typer.Option(min=0.0, help="With --scst: the decoder learning rate.")] = 5e-5,
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16 where supported).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder step.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, batch order and dropout.")] = 0,
    tensorboard: TensorboardOption = False,
    config: ConfigOption = None,
    print_config: PrintConfigOption = False,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a captioner on a preprocessed dataset; writes last.pt, best.pt, metrics.jsonl and steps.jsonl.

    metrics.jsonl has a line per epoch; steps.jsonl the loss and learning rate of every step.

    With torchrun (`torchrun --nproc_per_node N -m satcli train ...`) it trains on N processes with DDP.
    With --json, the run's result (checkpoints, epochs, best validation BLEU-4, per-epoch history) goes to stdout.
    """
    from satcli.commands import train as step

    # every parameter but the output switches is the TrainOptions field of the same name
    params = {name: value for name, value in ctx.params.items() if name not in ("quiet", *NOT_FROM_FILE)}
    options = step.TrainOptions(**{**params, "attention": attention.value, "given": _given(ctx)})
    if print_config:
        typer.echo(to_toml({k: v for k, v in options.to_dict().items() if k in params}, "train"), nl=False)
        return
    if dry_run:
        print_plan(step.plan(options), as_json)
        return
    result = step.run(options)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # torchrun: rank 0 says what the run did
        print_trained(result, as_json)


def _given(ctx: click.Context) -> frozenset[str]:
    """The parameters set on the command line or through the environment (not left at their defaults)."""
    # compared by name: Typer may carry its own copy of click's ParameterSource enum
    return frozenset(name for name in ctx.params
                     if getattr(ctx.get_parameter_source(name), "name", None) in
                     ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP"))
