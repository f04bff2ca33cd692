"""``satcli demo``: the embedded default. Draw the shapes dataset, preprocess it, train a captioner on the CPU in
minutes, score it on the test split with beam search, caption the test images into a results Parquet, and say
where everything is.

The recipe is tuned for a 2-core CPU (a small decoder, a high learning rate, a few
epochs); real datasets keep the paper's defaults of ``satcli train``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from satcli.captioning.options import CaptionOptions
from satcli.captioning.pipeline import caption_images
from satcli.core.console import console, shown, visible
from satcli.core.errors import SatcliError
from satcli.data.preprocess import PreprocessOptions, summary_table
from satcli.data.preprocess import preprocess as preprocess
from satcli.data.store import DatasetKind, StoredDataset
from satcli.pictures.overlays import write_overlays
from satcli.pictures.report import ReportOptions
from satcli.pictures.report import build_report as build_report
from satcli.scoring.evaluate import BeamResult, EvaluateOptions
from satcli.scoring.evaluate import evaluate as evaluate
from satcli.training import TrainOptions, train

log = logging.getLogger(__name__)

N_OVERLAYS = 8  # test images drawn as attention pictures (the HTML report shows every one)


@dataclass(frozen=True)
class DemoOptions:
    data_root: Path = Path("data")
    out: Path = Path("runs/shapes-demo")
    epochs: int = 6
    n_train: int = 4000
    n_val: int = 300
    n_test: int = 300
    n_heldout: int = 300  # the test in a held-out appearance: does recognition generalise?
    beam_size: int = 3
    device: str = "auto"
    seed: int = 0


@dataclass
class DemoResult:
    model: Path
    results: Path
    report: Path
    scores: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, float] = field(default_factory=dict)  # object metrics and BLEU/CIDEr-D on split heldout
    seconds: float = 0.0
    overlays: Path | None = None  # attention pictures of the first test images
    page: Path | None = None  # the HTML report of the test captions
    n_pictures: int = 0  # attention pictures drawn (a PNG and a GIF each)
    beam_size: int = 3
    shapes_images: Path | None = None  # the test images' folder, for the closing hint

    def renderables(self) -> list[RenderableType]:
        """What ``satcli demo`` prints at the end: the scores, the objects named, where everything is, what next."""
        table = Table(title=f"shapes test split, beam {self.beam_size} (scores 0–100)")
        for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "pointing (chance)"):
            table.add_column(name, justify="right")
        scores = self.scores
        table.add_row(*(f"{100 * scores[k]:.1f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "coco_cider_d")),
                      f"{100 * scores.get('grounding_pointing', 0):.1f} "
                      f"({100 * scores.get('grounding_pointing_chance', 0):.1f})")
        where = (f"model:    {shown(self.model)}\nscores:   {shown(self.report)}\ncaptions: {shown(self.results)}\n"
                 f"pictures: {shown(self.overlays)} ({self.n_pictures} images: a PNG and a GIF each)\n"
                 f"report:   {shown(self.page)}\ntime:     {self.seconds / 60:.1f} minutes")
        hint = Text(visible(closing_hint(self.model, self.shapes_images or Path("shapes/images"))))
        return [table, _objects_table(scores, self.heldout, self.beam_size), where, hint]


def demo_train_options(options: DemoOptions) -> TrainOptions:
    """The demo's training recipe (measured in README's demo section)."""
    return TrainOptions(dataset="shapes", data_root=options.data_root, out=options.out, overwrite=True,
                        embed_dim=128, attention_dim=128, decoder_dim=256, dropout=0.5,
                        epochs=options.epochs, batch_size=64, decoder_lr=2e-3, lr_patience=2, patience=options.epochs,
                        device=options.device, seed=options.seed)


def run(options: DemoOptions) -> DemoResult:
    """Draw, preprocess, train, evaluate, caption and report, narrating each step; the result's
    :meth:`DemoResult.renderables` are the scores and paths to show."""
    started = time.perf_counter()
    console.rule("[bold]satcli demo[/]: shapes → preprocess → train → evaluate → caption → report")
    dataset = _shapes_store(options)
    result = train(demo_train_options(options))
    console.print(result.table())
    console.print(result.closing_line())

    # BLEU, the Java-free COCO metrics and grounding: the same numbers on every machine, Java or not.
    evaluated = evaluate(EvaluateOptions(dataset=dataset.name, model=result.best, data_root=options.data_root,
                                         split="test", beam_sizes=(options.beam_size,), bleu=True, coco=True,
                                         grounding=True, objects=True, java=False, out=options.out, max_length=30,
                                         device=options.device))
    report_json = evaluated.report
    beam = evaluated.beams[0]
    scores = {**beam.metrics, **({f"grounding_{k}": v for k, v in beam.grounding.to_dict().items()}
                                 if beam.grounding else {}), **_object_scores(beam)}
    heldout: dict[str, float] = {}
    if options.n_heldout:
        unseen = evaluate(EvaluateOptions(dataset=dataset.name, model=result.best, data_root=options.data_root,
                                          split="heldout", beam_sizes=(options.beam_size,), bleu=True, coco=True,
                                          objects=True, java=False, out=options.out / "evaluate-heldout",
                                          max_length=30, device=options.device))
        heldout = {**unseen.beams[0].metrics, **_object_scores(unseen.beams[0])}

    source = options.data_root / "shapes" / "source"
    test_images = _split_images(source, "test")
    results = options.out / "test_captions.parquet"
    caption_images(CaptionOptions(inputs=tuple(str(p) for p in test_images), model=result.best, output=results,
                                  overwrite=True, beam_size=options.beam_size, root=source / "images",
                                  device=options.device, workers=0 if torch.get_num_threads() <= 2 else None))
    drawn = write_overlays(results, source / "images", options.out / "overlays", limit=N_OVERLAYS)
    page = build_report(ReportOptions(results, options.out / "report.html", image_root=source / "images")).output
    seconds = time.perf_counter() - started
    return DemoResult(result.best, results, report_json, scores, heldout, seconds, drawn.directory, page,
                      drawn.n_written, options.beam_size, source / "images")


def _object_scores(beam: BeamResult) -> dict[str, float]:
    return {f"objects_{k}": v for k, v in beam.objects.to_dict().items()} if beam.objects else {}


def _objects_table(test: dict[str, float], heldout: dict[str, float], beam_size: int) -> Table:
    """Does the caption name what is in the picture? On the test split, and on the held-out appearance."""
    table = Table(title=f"objects named, beam {beam_size} (0–100; CHAIR: lower is better)")
    columns = {"object precision": "objects_precision", "object recall": "objects_recall",
               "exact set": "objects_exact_set", "CHAIR-i": "objects_chair_i", "CHAIR-s": "objects_chair_s",
               "BLEU-4": "bleu4", "CIDEr-D": "coco_cider_d"}
    table.add_column("split")
    for name in columns:
        table.add_column(name, justify="right")
    for split, scores in (("test", test), ("heldout (unseen look)", heldout)):
        if scores:
            table.add_row(split, *(f"{100 * scores[key]:.1f}" for key in columns.values()))
    return table


def closing_hint(model: Path, shapes_images: Path) -> str:
    """What to try next: more shapes pictures. Not the user's photos: this model has seen only coloured shapes."""
    return (f"next:     satcli caption {shapes_images} --model {model} -o shapes.parquet\n"
            "          (this model knows only coloured shapes and will describe any photo as shapes; for real photos, "
            "train on captioned photos such as Flickr8k: see the README's worked example)")


def _shapes_store(options: DemoOptions) -> StoredDataset:
    try:
        dataset = StoredDataset.open(options.data_root, "shapes")
        splits = dataset.meta.get("splits", {})
        if [splits.get(s, {}).get("images") for s in ("train", "val", "test", "heldout")] == \
                [options.n_train, options.n_val, options.n_test, options.n_heldout or None]:
            console.print(f"using the shapes dataset in {shown(dataset.root)}")
            return dataset
    except SatcliError:
        pass
    shapes = PreprocessOptions(dataset=DatasetKind.shapes, data_root=options.data_root, n_train=options.n_train,
                               n_val=options.n_val, n_test=options.n_test, n_heldout=options.n_heldout,
                               seed=options.seed)
    console.print(summary_table(preprocess(shapes), shapes))  # the demo narrates its steps as they finish
    return StoredDataset.open(options.data_root, "shapes")


def _split_images(source: Path, split: str) -> list[Path]:
    entries = json.loads((source / "dataset_shapes.json").read_text())["images"]
    return [source / "images" / e["filename"] for e in entries if e["split"] == split]
