"""What a caption run is asked to do (:class:`CaptionOptions`) and what it did (:class:`CaptionSummary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from models.decoding import DecodingOptions
from satcli.core.console import shown
from satcli.core.errors import SatcliError
from satcli.data.images import DEFAULT_MAX_PIXELS, HARD_MAX_PIXELS
from satcli.data.vocab import banned_words
from satcli.pictures.overlays import OverlaySummary

DEFAULT_OUTPUT = Path("captions.parquet")


@dataclass(frozen=True)
class CaptionOptions:
    """What ``satcli caption`` was asked to do."""

    inputs: tuple[str, ...]  # files, directories (walked recursively), glob patterns, URLs, tar/Parquet shards
    model: Path | None = None  # None: $SATCLI_MODEL, else the last model trained here
    output: Path | str = DEFAULT_OUTPUT  # shards as inputs: a folder (local, or a URL) for one file per shard
    overwrite: bool = False  # ignore any earlier results or unfinished run for this output
    batch_size: int = 32
    beam_size: int = 3
    max_length: int = DecodingOptions.max_length
    length_penalty: float = 0.0
    n_best: int = 1  # > 1: the runners-up go to the ``alternatives`` column
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    allow_unk: bool = False  # let captions contain <unk> (banned by default: users would see a literal "<unk>")
    workers: int | None = None  # image-decoding processes; None: min(4, CPUs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    shard: tuple[int, int] | None = None  # (K, N); None: RANK/WORLD_SIZE under torchrun, else everything
    root: Path | None = None  # result paths are relative to this directory (None: the current one)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    progress: bool = True
    overlays: Path | None = None  # a folder: attention pictures of every captioned image, after the Parquet
    exclude: tuple[str, ...] = ()  # glob patterns of files to leave out
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec keyword arguments for URLs
    column: str | None = None  # Parquet inputs: the column of images or paths (None: jpg, image, ...)
    skip_existing: bool = False  # shards: skip samples whose key is in an earlier results file of the folder
    engine: str = "local"  # local | ray: shards captioned by Ray Data actors (satcli.engines.ray_job)
    address: str | None = None  # --engine ray: the cluster (None: the one this process joined, else a local one)
    actors: int | None = None  # --engine ray: how many (None: one per GPU, else one per CPU of the cluster)


@dataclass
class CaptionSummary:
    """What a caption run did. Counts cover this run's images, those done before included (``n_kept``: the
    earlier rows of other images the output also holds); ``n_processed`` only the images captioned now."""

    output: Path | str  # a URL for a sharded run writing to object storage
    n_images: int
    n_resumed: int = 0
    n_kept: int = 0  # earlier rows of images not among this run's inputs, kept in the output
    paths: frozenset[str] | None = None  # this run's images when the output holds others too (None: every row)
    n_processed: int = 0
    n_captioned: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    shard: tuple[int, int] = (0, 1)
    overlays: OverlaySummary | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # files left out by extension (".txt" → 3)
    n_excluded: int = 0  # files an --exclude pattern left out
    n_shards: int = 0  # shards as inputs: how many this run took
    n_shards_resumed: int = 0  # of which their results file was already complete
    n_duplicates: int = 0  # samples skipped with --skip-existing: their key was in an earlier results file

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def images_per_second(self) -> float:
        return self.n_processed / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> Table:
        """The end-of-run summary shown by the CLI."""
        title = "Captions" if self.shard[1] == 1 else f"Captions, part {self.shard[0]} of {self.shard[1]}"
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        if self.n_shards:
            table.add_row("shards", f"{self.n_shards:,}")
            if self.n_shards_resumed:
                table.add_row("  done before", f"{self.n_shards_resumed:,}")
        table.add_row("images", f"{self.n_images:,}")
        if self.skipped:
            table.add_row("skipped (not images)", f"{sum(self.skipped.values()):,}")
            for extension, n in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])):
                table.add_row(f"  {extension or '(no extension)'}", f"{n:,}")
        if self.n_excluded:
            table.add_row("excluded", f"{self.n_excluded:,}")
        if self.n_duplicates:
            table.add_row("keys done before", f"{self.n_duplicates:,}")
        if self.n_resumed:
            table.add_row("done before", f"{self.n_resumed:,}")
        if self.n_kept:
            table.add_row("earlier rows kept", f"{self.n_kept:,}")
        table.add_row("captioned", f"{self.n_captioned:,}")
        table.add_row("errors", f"{self.n_errors:,}")
        for kind, n in sorted(self.errors.items()):
            table.add_row(f"  {kind}", f"{n:,}")
        if self.n_processed:
            table.add_row("time", f"{self.seconds:.1f} s")
            table.add_row("images/s", f"{self.images_per_second:.1f}")
            table.add_row("device", shown(self.device))
        table.add_row("output", shown(self.output))
        if self.overlays is not None:
            table.add_row("attention pictures", f"{self.overlays.n_written:,} in {shown(self.overlays.directory)}")
            if self.overlays.n_missing_images:
                table.add_row("  images not found", f"{self.overlays.n_missing_images:,} (drawn grey)")
        return table


def decoding_options(options: CaptionOptions) -> DecodingOptions:
    """The beam search ``options`` ask for; a SatcliError for values it refuses."""
    try:
        return DecodingOptions(beam_size=options.beam_size, max_length=options.max_length,
                               length_penalty=options.length_penalty, n_best=options.n_best,
                               no_repeat_ngram_size=options.no_repeat_ngram_size, min_length=options.min_length,
                               banned_ids=banned_words(options.allow_unk))
    except ValueError as error:
        raise SatcliError(str(error)) from None


def check_options(options: CaptionOptions) -> None:
    """Refuse, as one-line errors, options no run could use."""
    if options.batch_size < 1:
        raise SatcliError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.engine not in ("local", "ray"):
        raise SatcliError(f"--engine must be local or ray, got {options.engine!r}")
    if options.workers is not None and options.workers < 0:
        raise SatcliError(f"--workers must be 0 or more, got {options.workers}")
    if options.max_pixels is not None and not 1 <= options.max_pixels <= HARD_MAX_PIXELS:
        raise SatcliError(f"--max-pixels must be between 1 and {HARD_MAX_PIXELS:,} (Pillow's own hard limit), "
                          f"got {options.max_pixels:,}")
    if str(options.output) == "-":
        raise SatcliError("-o - would write the Parquet results to a file named '-'; for results on stdout use "
                          "--json (a JSON line per image), or name a .parquet file with -o")
    if options.overlays is not None and options.overlays.exists() and not options.overlays.is_dir():
        raise SatcliError("--overlays names a file; name a folder for the attention pictures", options.overlays)


def check_single_output(output: Path | str) -> Path:
    """The output of a run over loose images: one local .parquet file (an existing folder is refused)."""
    if isinstance(output, str) and "://" in output:
        raise SatcliError("results of loose images go to one local file; object storage outputs are for tar or "
                          "Parquet shards as inputs (one results file per shard)", output)
    output = Path(output)
    if output.exists() and output.is_dir():
        raise SatcliError("the output is a directory; name a .parquet file with -o", output)
    return output
