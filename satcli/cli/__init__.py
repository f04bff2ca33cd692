"""The ``satcli`` command line. Commands stay thin: arguments → an options dataclass → ``<step>.run(options)``.

User mistakes arrive here as :class:`~satcli.core.errors.SatcliError` and leave as one red line and exit code 1;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console

from satcli.cli import options as opt
from satcli.cli.model_commands import register_model_commands
from satcli.cli.options import (
    AllowUnkOption,
    BatchSizeOption,
    BeamSizeOption,
    CocoReferences,
    DataRootOption,
    DeviceOption,
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
    ThreadsOption,
    WorkersOption,
)
from satcli.cli.output import (
    print_captions,
    print_drawn,
    print_evaluated,
    print_plan,
)
from satcli.cli.report_command import report
from satcli.cli.train_command import register_train
from satcli.core.atomic import disk_error
from satcli.core.console import VisibleFormatter, VisibleRichHandler, out_console, set_quiet, shown
from satcli.core.console import console as human
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

    def list_commands(self, ctx: click.Context) -> list[str]:
        """In the order of the work: try it, prepare data, train, score, caption, look, then the tools."""
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: WORKFLOW.index(n) if n in WORKFLOW else len(WORKFLOW))

    @staticmethod
    def _fail(ctx: click.Context, message: str) -> NoReturn:
        if (ctx.obj or {}).get("verbose"):
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


WORKFLOW = ("demo", "preprocess", "train", "evaluate", "caption", "merge", "report", "info", "export", "encoders")
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
    # Not a terminal (a log file, CI): plain lines that never wrap, so commands in them stay copyable.
    handler = (VisibleRichHandler(console=err_console, show_path=verbose, show_time=False) if err_console.is_terminal
               else logging.StreamHandler())
    if not err_console.is_terminal:
        handler.setFormatter(VisibleFormatter("%(levelname)-8s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(message)s", handlers=[handler], force=True)


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
    dry_run: opt.CaptionDryRunOption = False,
    engine: opt.EngineOption = "local", address: opt.AddressOption = None, actors: opt.ActorsOption = None,
    as_json: JsonOption = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help=f"Exit with code {EXIT_FAILED_IMAGES} when some images could not be captioned.")] = False,
    threads: ThreadsOption = None,
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

    options = step.CaptionOptions(
        inputs=tuple(inputs), model=model, output=opt.caption_output(output), overwrite=overwrite,
        exclude=tuple(exclude or ()), storage_options=opt.storage_options(storage_option), column=column,
        skip_existing=skip_existing, batch_size=batch_size, beam_size=beam_size, max_length=max_length,
        length_penalty=length_penalty, n_best=n_best, no_repeat_ngram_size=no_repeat_ngram, min_length=min_length,
        allow_unk=allow_unk, workers=workers, device=device, shard=None if shard is None else parse_shard(shard),
        root=root, max_pixels=max_pixels, overlays=overlays, engine=engine, address=address, actors=actors,
    )
    if dry_run:
        print_plan(step.plan(options), as_json)
        return
    summary = step.run(options)
    if not summary.n_shards:  # a sharded run's rows are in one file per shard: its summary alone
        print_captions(summary.output, summary.n_images, as_json, summary.paths)
    human.print(summary.table())
    if strict and summary.n_errors:
        err_console.print(f"[bold red]error:[/] {summary.n_errors:,} of {summary.n_images:,} images could not be "
                          f"captioned (see the error column of {shown(summary.output)})", highlight=False,
                          soft_wrap=True)
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

register_train(app)


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option("--dataset", help="A preprocessed dataset under the data root.")],
    model: ModelOption = None,
    ensemble: Annotated[list[Path] | None, typer.Option(
        "--ensemble", exists=True, dir_okay=False, show_default=False,
        help="Another checkpoint to decode with --model as one model (the mean of their word probabilities); "
        "repeat for more. All must share the frozen encoder and the vocabulary.")] = None,
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
    coco_references: Annotated[CocoReferences, typer.Option(
        "--coco-references", help="official: the raw reference captions through the PTB tokenizer, as the COCO "
        "evaluation does; vocabulary: re-tokenised by the vocabulary's rule first (not comparable with "
        "published numbers).")] = CocoReferences.official,
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
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Score a model on a dataset split: BLEU, COCO metrics, attention grounding; writes report.json and Parquet.

    With --json, report.json's content goes to stdout as one line (scores on the 0–1 scale).
    """
    from satcli.commands import evaluate as step

    result = step.run(step.EvaluateOptions(
        dataset=dataset, model=model, data_root=data_root, split=split,
        beam_sizes=step.parse_beam_sizes(beam_sizes) if beam_sizes else (beam_size,), bleu=bleu, coco=coco,
        grounding=grounding, objects=objects, java=java, coco_references=coco_references.value, out=out,
        max_length=max_length, length_penalty=length_penalty, n_best=n_best, no_repeat_ngram_size=no_repeat_ngram,
        min_length=min_length, allow_unk=allow_unk, batch_size=batch_size, device=device,
        ensemble=tuple(ensemble or ()),
    ))
    print_evaluated(result, f"{dataset}/{split}", as_json)
    if overlays is not None:
        from satcli.pictures.overlays import dataset_images, write_overlays

        images = dataset_images(data_root, dataset)
        for beam in result.beams:
            folder = overlays if len(result.beams) == 1 else overlays / f"beam{beam.beam_size}"
            print_drawn(write_overlays(beam.predictions, images, folder))


app.command()(report)


@app.command()
def demo(
    data_root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Run folder.")] = Path("runs/shapes-demo"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the drawn pictures and of training.")] = 0,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """The whole job on the built-in shapes dataset: draw → preprocess → train → evaluate → caption, on CPU in
    minutes."""
    from satcli.commands import demo as step

    result = step.run(step.DemoOptions(data_root=data_root, out=out, epochs=epochs, device=device, seed=seed))
    for renderable in result.renderables():
        human.print(renderable)


register_model_commands(app)


def main() -> None:
    app()
