"""The ``satcli`` command line. Commands stay thin: arguments → an options dataclass → ``<step>.run(options)``.

User mistakes arrive here as :class:`~satcli.core.errors.SatcliError` and leave as one red line and exit code 1;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from satcli.cli import options as opt
from satcli.cli.options import (
    AllowUnkOption,
    Attention,
    BatchSizeOption,
    BeamSizeOption,
    DataRootOption,
    DeviceOption,
    FeatureFlipsOption,
    FeatureShiftsOption,
    FeatureViewsOption,
    JsonOption,
    LengthPenaltyOption,
    MaxLengthOption,
    MinLengthOption,
    ModelOption,
    NBestOption,
    NoRepeatNgramOption,
    OverlaysOption,
    QuietOption,
    ResultsOption,
    WorkersOption,
)
from satcli.cli.output import print_captions, print_drawn, print_evaluated, print_reported, print_trained
from satcli.core.atomic import disk_error
from satcli.core.console import console as human
from satcli.core.console import out_console, set_quiet
from satcli.core.errors import SatcliError
from satcli.core.version import __version__
from satcli.data.store import DatasetKind

console = out_console  # results a script reads (captions, --json, tables a command exists to print)
err_console = Console(stderr=True)  # errors: never silenced by --quiet
log = logging.getLogger("satcli")
EXIT_FAILED_IMAGES = 3  # caption --strict when some images could not be captioned


class _Group(typer.core.TyperGroup):
    """Turns SatcliError into one red line and exit code 1, for the real CLI and for CliRunner alike."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SatcliError as error:
            self._fail(ctx, str(error))
        except OSError as error:
            # A full disk or a read-only folder is the user's to fix, wherever the write happened.
            if error.errno not in _DISK_ERRNOS:
                raise
            self._fail(ctx, str(disk_error(error, error.filename)))

    @staticmethod
    def _fail(ctx: click.Context, message: str) -> NoReturn:
        if (ctx.obj or {}).get("verbose"):
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


app = typer.Typer(
    cls=_Group,
    name="satcli",
    help="Batch image captioning with Show, Attend and Tell: train, evaluate, caption, and see where it looked.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"satcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Only results, warnings and errors: no progress, tables or notes.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = {"verbose": verbose}
    set_quiet(quiet)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=verbose, show_time=False)],
        force=True,
    )


@app.command()
def encoders() -> None:
    """List the image encoders, their input size, feature grid and where their weights come from."""
    from satcli.commands import encoders as step

    table = Table(title="Encoders")
    for column in ("name", "input", "grid", "dim", "pretrained weights"):
        table.add_column(column)
    for spec in step.run():
        grid = spec.grid_shape(spec.image_size, spec.image_size)
        name = f"{spec.name} (default)" if spec.name == step.default() else spec.name
        table.add_row(name, f"{spec.image_size}px", f"{grid[0]}×{grid[1]}", str(spec.dim), spec.weights_source)
    console.print(table)


@app.command()
def preprocess(
    dataset: Annotated[DatasetKind, typer.Option("--dataset", help="What kind of dataset the files hold.")],
    images: Annotated[Path | None, typer.Option(
        "--images", exists=True, file_okay=False, help="Folder the caption file's image paths start from.")] = None,
    captions: Annotated[Path | None, typer.Option(
        "--captions", exists=True, dir_okay=False, help="Caption file (format detected from its content).")] = None,
    splits: Annotated[Path | None, typer.Option(
        "--splits", exists=True, file_okay=False,
        help="Folder with Flickr_8k.{train,dev,test}Images.txt (default: beside the caption file, if there).")] = None,
    name: Annotated[str | None, typer.Option(help="Store name under the data root (default: the kind).")] = None,
    data_root: DataRootOption = Path("data"),
    instances: Annotated[Path | None, typer.Option(
        "--instances", exists=True, dir_okay=False,
        help="COCO instance annotations (instances_val2014.json): each image's objects, for evaluate --objects.")
    ] = None,
    min_word_freq: Annotated[int, typer.Option(min=1, help="Keep words seen this often in train captions.")] = 5,
    max_caption_length: Annotated[int, typer.Option(min=1, help="Cut captions to this many words.")] = 50,
    image_size: Annotated[int, typer.Option(min=16, help="Side of the stored square images, in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of generated splits and of the shapes dataset.")] = 0,
    n_train: Annotated[int, typer.Option(min=0, help="shapes: training images to draw.")] = 4000,
    n_val: Annotated[int, typer.Option(min=0, help="shapes: validation images to draw.")] = 300,
    n_test: Annotated[int, typer.Option(min=0, help="shapes: test images to draw.")] = 300,
    n_heldout: Annotated[int, typer.Option(
        min=0, help="shapes: test images to draw in a held-out appearance (split 'heldout').")] = 300,
    quiet: QuietOption = False,
) -> None:
    """Read a captioned image dataset (or draw the shapes one) into a store under the data root for training."""
    from satcli.commands import preprocess as step

    options = step.PreprocessOptions(
        dataset=dataset, images=images, captions=captions, splits=splits, name=name, data_root=data_root,
        min_word_freq=min_word_freq, max_caption_length=max_caption_length, image_size=image_size, seed=seed,
        instances=instances, n_train=n_train, n_val=n_val, n_test=n_test, n_heldout=n_heldout,
    )
    human.print(step.summary_table(step.run(options), options))


@app.command()
def caption(
    inputs: Annotated[list[str], typer.Argument(
        help="Images, folders, globs, URLs (s3://...), tar/Parquet shards ({00000..00099}.tar).", show_default=False)],
    model: ModelOption = None,
    output: opt.CaptionOutputOption = "captions.parquet",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start afresh instead of resuming or extending earlier results in the output.")] = False,
    beam_size: BeamSizeOption = 3,
    max_length: MaxLengthOption = 50,
    length_penalty: LengthPenaltyOption = 0.0,
    n_best: NBestOption = 1,
    no_repeat_ngram: NoRepeatNgramOption = 0,
    min_length: MinLengthOption = 0,
    allow_unk: AllowUnkOption = False,
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="K/N", show_default=False,
        help="Caption only shard K (from 0) of N into <output>.part-K-of-N; under torchrun: RANK/WORLD_SIZE.")] = None,
    root: Annotated[Path | None, typer.Option(
        "--root", file_okay=False, show_default=False,
        help="Write paths relative to this folder. Default: the current one.")] = None,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", min=1, help="Refuse bigger images (decompression bombs) as errors.")] = 89_478_485,
    overlays: OverlaysOption = None,
    exclude: opt.ExcludeOption = None,
    storage_option: opt.StorageOption = None,
    column: opt.ColumnOption = None,
    skip_existing: opt.SkipExistingOption = False,
    engine: opt.EngineOption = "local", address: opt.AddressOption = None, actors: opt.ActorsOption = None,
    as_json: JsonOption = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help=f"Exit with code {EXIT_FAILED_IMAGES} when some images could not be captioned.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Caption photos into a Parquet file with one row per image: caption, words and attention maps.

    On stdout: the caption of one image, or `path → caption` lines for up to 20 (more: only the summary).

    With --json: a JSON line per image (path, caption, words, word_probs, sum_logprob, finished, error).

    The summary and progress go to stderr.

    Rerun the same command after an interruption to continue where it stopped. Files that are not readable
    images become rows with an error; the run goes on.
    """
    from satcli.captioning.shards import parse_shard
    from satcli.commands import caption as step

    summary = step.run(step.CaptionOptions(
        inputs=tuple(inputs), model=model, output=opt.caption_output(output), overwrite=overwrite,
        exclude=tuple(exclude or ()), storage_options=opt.storage_options(storage_option), column=column,
        skip_existing=skip_existing, batch_size=batch_size, beam_size=beam_size, max_length=max_length,
        length_penalty=length_penalty, n_best=n_best, no_repeat_ngram_size=no_repeat_ngram, min_length=min_length,
        allow_unk=allow_unk, workers=workers, device=device, shard=None if shard is None else parse_shard(shard),
        root=root, max_pixels=max_pixels, overlays=overlays, engine=engine, address=address, actors=actors,
    ))
    if not summary.n_shards:  # a sharded run's rows are in one file per shard: its summary alone
        print_captions(summary.output, summary.n_images, as_json)
    human.print(summary.table())
    if strict and summary.n_errors:
        err_console.print(f"[bold red]error:[/] {summary.n_errors:,} of {summary.n_images:,} images could not be "
                          f"captioned (see the error column of {summary.output})", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED_IMAGES)


@app.command()
def merge(
    parts: Annotated[list[Path] | None, typer.Argument(
        help="Part files (default: every <output>.part-K-of-N file beside the output).", show_default=False)] = None,
    output: ResultsOption = Path("captions.parquet"),
    remove_parts: Annotated[bool, typer.Option("--remove-parts", help="Delete the parts once merged.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Merge the parts written by sharded caption runs (--shard K/N, torchrun) into one results file."""
    from satcli.commands import merge as step

    summary = step.run(step.MergeOptions(parts=tuple(parts or ()), output=output, remove_parts=remove_parts))
    human.print(summary.table())

@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", help="A preprocessed dataset under the data root.")],
    data_root: DataRootOption = Path("data"),
    out: Annotated[Path | None, typer.Option(
        "--out", file_okay=False, show_default=False, help="Run folder. Default: runs/<dataset>.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in --out.")] = False,
    encoder: Annotated[str, typer.Option(
        help="Image encoder (see `satcli encoders`).")] = "efficientnet-lite0-stage6",
    attention: Annotated[Attention, typer.Option(
        help="soft: the expected context; hard: a sampled location, trained with REINFORCE (the paper's 4.1).")
    ] = Attention.soft,
    image_size: Annotated[int | None, typer.Option(
        min=32, show_default=False, help="Encoder input size. Default: the encoder's own.")] = None,
    grid_size: Annotated[int | None, typer.Option(
        min=1, show_default=False, help="Pool the feature map to this many cells a side (the paper: 14).")] = None,
    embed_dim: Annotated[int, typer.Option(min=1, help="Word embedding size.")] = 512,
    attention_dim: Annotated[int, typer.Option(min=1, help="Attention layer size.")] = 512,
    decoder_dim: Annotated[int, typer.Option(min=1, help="LSTM size.")] = 512,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="Dropout before the output layers.")] = 0.5,
    doubly_stochastic: Annotated[float, typer.Option(
        min=0.0, help="λ of the attention regulariser λ·meanᵢ(1 − Σₜ αₜᵢ)², added to the per-token NLL "
        "(cross-entropy training; SCST optimises CIDEr-D alone).")] = 1.0,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (one pass over every training caption).")] = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="Captions per step, over all processes.")] = 64,
    decoder_lr: Annotated[float, typer.Option(min=0.0, help="Decoder learning rate.")] = 4e-4,
    encoder_lr: Annotated[float, typer.Option(min=0.0, help="Encoder learning rate when fine-tuning.")] = 1e-4,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Clip gradients to this norm.")] = 5.0,
    lr_decay: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Multiply learning rates by this when validation BLEU-4 stalls.")] = 0.8,
    lr_patience: Annotated[int, typer.Option(
        min=1, help="Epochs without validation improvement before the learning rates decay.")] = 3,
    patience: Annotated[int, typer.Option(
        min=1, help="Stop after this many epochs without validation improvement.")] = 10,
    scheduled_sampling: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Probability of feeding the model its own previous word.")] = 0.0,
    fine_tune_encoder: Annotated[bool, typer.Option(
        "--fine-tune-encoder", help="Train the encoder too, on augmented images.")] = False,
    fine_tune_after: Annotated[int, typer.Option(min=0, help="Start fine-tuning after this many epochs.")] = 0,
    fine_tune_blocks: Annotated[int, typer.Option(
        help="Encoder blocks to fine-tune from the top (-1: all, the stem included).")] = 6,
    feature_flips: FeatureFlipsOption = False,
    feature_shifts: FeatureShiftsOption = False,
    feature_views: FeatureViewsOption = 0,
    val_beam_size: Annotated[int, typer.Option(min=1, help="Beam size of validation decoding.")] = 1,
    scst: Annotated[bool, typer.Option(
        "--scst", help="Self-critical fine-tuning of --init with a CIDEr-D reward and the greedy caption as "
        "baseline (--out default: runs/<dataset>-scst; learning rate: --scst-lr).")] = False,
    init: Annotated[Path | None, typer.Option(
        "--init", exists=True, dir_okay=False, show_default=False, help="With --scst: the checkpoint to start from.")
    ] = None,
    scst_samples: Annotated[int, typer.Option(min=1, help="With --scst: captions sampled per image.")] = 5,
    scst_lr: Annotated[float, typer.Option(min=0.0, help="With --scst: the decoder learning rate.")] = 5e-5,
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16 where supported).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder step.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, batch order and dropout.")] = 0,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Also write TensorBoard event files to <out>/tensorboard (needs: pip install "
        "tensorboard).")] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a captioner on a preprocessed dataset; writes last.pt, best.pt, metrics.jsonl and steps.jsonl.

    metrics.jsonl has a line per epoch; steps.jsonl the loss and learning rate of every step.

    With torchrun (`torchrun --nproc_per_node N -m satcli train ...`) it trains on N processes with DDP.
    With --json, the run's result (checkpoints, epochs, best validation BLEU-4, per-epoch history) goes to stdout.
    """
    from satcli.commands import train as step

    # every parameter but the output switches is the TrainOptions field of the same name
    params = {name: value for name, value in ctx.params.items() if name not in ("as_json", "quiet")}
    result = step.run(step.TrainOptions(**{**params, "attention": attention.value, "given": _given(ctx)}))
    if int(os.environ.get("RANK", "0") or 0) == 0:  # torchrun: rank 0 says what the run did
        print_trained(result, as_json)


def _given(ctx: click.Context) -> frozenset[str]:
    """The parameters set on the command line or through the environment (not left at their defaults)."""
    # compared by name: Typer may carry its own copy of click's ParameterSource enum
    return frozenset(name for name in ctx.params
                     if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT"))


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option("--dataset", help="A preprocessed dataset under the data root.")],
    model: ModelOption = None,
    data_root: DataRootOption = Path("data"),
    split: Annotated[str, typer.Option(help="Split to caption and score.")] = "test",
    beam_size: BeamSizeOption = 3,
    beam_sizes: Annotated[str | None, typer.Option(
        "--beam-sizes", metavar="K,K,...", show_default=False,
        help="Sweep several beam sizes in one run (images are encoded once), e.g. 1,3,5.")] = None,
    bleu: Annotated[bool, typer.Option("--bleu", help="Corpus BLEU-1..4 with NLTK (the default metric).")] = False,
    coco: Annotated[bool, typer.Option(
        "--coco", help="COCO metrics: BLEU, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap; METEOR needs Java).")] = False,
    grounding: Annotated[bool, typer.Option(
        "--grounding", help="Does attention land on the objects the caption names? (datasets with boxes)")] = False,
    objects: Annotated[bool, typer.Option(
        "--objects", help="Does the caption name the objects present? Object precision/recall, exact-set rate, "
        "CHAIR-i/-s (datasets with objects).")] = False,
    java: Annotated[bool, typer.Option(help="Let --coco use Java (METEOR, PTB tokenizer).")] = True,
    out: Annotated[Path | None, typer.Option(
        "--out", file_okay=False, show_default=False,
        help="Folder for report.json and the predictions. Default: <model folder>/evaluate-<dataset>-<split>.")] = None,
    max_length: MaxLengthOption = 50,
    length_penalty: LengthPenaltyOption = 0.0,
    n_best: NBestOption = 1,
    no_repeat_ngram: NoRepeatNgramOption = 0,
    min_length: MinLengthOption = 0,
    allow_unk: AllowUnkOption = False,
    batch_size: BatchSizeOption = 64,
    device: DeviceOption = "auto",
    overlays: OverlaysOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Score a model on a dataset split: BLEU, COCO metrics, attention grounding; writes report.json and Parquet.

    With --json, report.json's content goes to stdout as one line (scores on the 0–1 scale).
    """
    from satcli.commands import evaluate as step

    result = step.run(step.EvaluateOptions(
        dataset=dataset, model=model, data_root=data_root, split=split,
        beam_sizes=step.parse_beam_sizes(beam_sizes) if beam_sizes else (beam_size,), bleu=bleu, coco=coco,
        grounding=grounding, objects=objects, java=java, out=out, max_length=max_length,
        length_penalty=length_penalty, n_best=n_best, no_repeat_ngram_size=no_repeat_ngram, min_length=min_length,
        allow_unk=allow_unk, batch_size=batch_size, device=device,
    ))
    print_evaluated(result, f"{dataset}/{split}", as_json)
    if overlays is not None:
        from satcli.pictures.overlays import dataset_images, write_overlays

        images = dataset_images(data_root, dataset)
        for beam in result.beams:
            folder = overlays if len(result.beams) == 1 else overlays / f"beam{beam.beam_size}"
            print_drawn(write_overlays(beam.predictions, images, folder))


@app.command()
def report(
    results: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, help="A results Parquet file (satcli caption or evaluate).", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False,
        help="The HTML file. Default: the results file with .html. Thumbnails go to <name>_files/ beside it.")] = None,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", file_okay=False, show_default=False,
        help="Folder the results' relative paths start from. Default: the one the file records (caption's --root, "
             "evaluate's dataset images) if it still exists, else the current one.")] = None,
    thumb_size: Annotated[int, typer.Option(
        "--thumb-size", help="Pixels a side of the images' thumbnails, at most (at least 16).")] = 224,
    overlays: OverlaysOption = None,
    quiet: QuietOption = False,
) -> None:
    """Write one HTML page to browse the captions: search, scores, errors, and each word's attention on hover.

    The page works offline from disk; keep the thumbnail folder beside it.
    """
    from satcli.commands import report as step

    summary = step.run(step.ReportOptions(results=results, output=output, image_root=image_root,
                                          thumb_size=thumb_size))
    print_reported(summary)
    if overlays is not None:
        from satcli.pictures.overlays import write_overlays

        print_drawn(write_overlays(results, image_root, overlays))


@app.command()
def demo(
    data_root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Run folder.")] = Path("runs/shapes-demo"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 6,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """The whole job on the built-in shapes dataset: draw → preprocess → train → evaluate → caption, on CPU in
    minutes."""
    from satcli.commands import demo as step

    result = step.run(step.DemoOptions(data_root=data_root, out=out, epochs=epochs, device=device))
    for renderable in result.renderables():
        human.print(renderable)


def main() -> None:
    app()
