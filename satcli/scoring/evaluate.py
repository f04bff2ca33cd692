"""``satcli evaluate``: caption a split of a preprocessed dataset and score the captions.

- ``--bleu``: corpus BLEU-1..4 with NLTK over all references of each image (as the PyTorch tutorials report it).
- ``--coco``: the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through pycocoevalcap, or, without
  Java or the package, our equal BLEU / ROUGE-L / CIDEr-D with METEOR skipped and the reason said.
- ``--grounding``: pointing game and attention mass in the referred objects' boxes, beside chance
  (:mod:`satcli.scoring.grounding`), on datasets that store object boxes.
- ``--objects``: does the caption name the objects in the picture? Object precision/recall, exact-set rate and
  CHAIR-i/-s (:mod:`satcli.scoring.objects`), on datasets that store objects with their words.
- ``--beam-sizes 1,3,5``: one sweep; every image is encoded (or read from the feature cache) once and decoded at
  every beam size.
- ``--ensemble B.pt`` (repeatable): decode ``--model`` and these checkpoints as one model, each word from the mean
  of their word probabilities (:class:`models.ensemble.Ensemble`); all must share the frozen encoder, its input
  size and grid, and the vocabulary, so the one feature cache serves them all.

Writes ``report.json`` (metrics per beam size on the 0–1 scale, dataset, split, model, decoding options,
satcli version) and the captions per beam size as results Parquet files (the schema of ``satcli caption``) to
``--out``, and returns a result whose :meth:`EvaluateResult.table` shows the scores on the 0–100 scale.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from models.decoding import DecodingOptions, DecodingResult
from models.ensemble import Ensemble
from satcli.core.atomic import write_text
from satcli.core.console import make_progress
from satcli.core.defaults import default_model
from satcli.core.device import resolve_device
from satcli.core.errors import SatcliError
from satcli.core.version import __version__
from satcli.data.features import cached_features
from satcli.data.store import StoredDataset
from satcli.data.text import detokenize, tokenize
from satcli.data.vocab import UNK, banned_words
from satcli.formats.checkpoint import LoadedCheckpoint, load_captioner_hashed
from satcli.formats.results import result_row, results_metadata, write_results
from satcli.scoring.decode import Decoded, decode_split, split_chunks
from satcli.scoring.grounding import GroundingScores, grounding_scores, objects_from_store
from satcli.scoring.metrics import bleu, coco_metrics
from satcli.scoring.objects import Lexicon, ObjectScores, build_lexicon, object_scores, present_objects
from satcli.scoring.per_image import ImageScores, per_image_scores

log = logging.getLogger(__name__)
REPORT = "report.json"


@dataclass(frozen=True)
class EvaluateOptions:
    """What to evaluate and how. With none of ``bleu``, ``coco``, ``grounding``, ``objects`` set, BLEU is
    computed."""

    dataset: str
    model: Path | None = None  # default: $SATCLI_MODEL, else the most recent `satcli train`
    data_root: Path = Path("data")
    split: str = "test"
    beam_sizes: tuple[int, ...] = (3,)
    bleu: bool = False
    coco: bool = False
    grounding: bool = False
    objects: bool = False
    java: bool = True  # False: the Java-free COCO metrics even where Java is installed
    coco_references: str = "official"  # how --coco treats the references: a key of COCO_REFERENCES
    out: Path | None = None  # default: <model folder>/evaluate-<dataset>-<split>
    max_length: int = 50
    length_penalty: float = 0.0
    n_best: int = 1  # > 1: the runners-up go to the predictions' alternatives column
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    allow_unk: bool = False  # let captions contain <unk> (banned by default, as in satcli caption)
    batch_size: int = 64
    device: str = "auto"
    ensemble: tuple[Path, ...] = ()  # more checkpoints decoded with ``model`` as one (mean word probabilities)


@dataclass
class BeamResult:
    """The scores of one beam size (0–1 scale; CIDEr-D on COCO's scale) and where its captions are."""

    beam_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    grounding: GroundingScores | None = None
    objects: ObjectScores | None = None
    predictions: Path | None = None
    seconds: float = 0.0


@dataclass
class EvaluateResult:
    report: Path
    beams: list[BeamResult]
    n_images: int
    coco_backend: str | None = None
    coco_references: str | None = None  # the protocol --coco used (a key of COCO_REFERENCES)
    skipped: dict[str, str] = field(default_factory=dict)

    def table(self, title: str = "") -> Table:
        """The scores of every beam size side by side, on the 0–100 scale."""
        table = Table(title=title or "Scores (0–100 scale)")
        if self.coco_references is not None:
            table.caption = f"COCO metrics: {COCO_REFERENCES[self.coco_references]}"
        table.add_column("metric")
        for beam in self.beams:
            table.add_column(f"beam {beam.beam_size}", justify="right")
        for key, label in METRIC_LABELS.items():
            if any(key in beam.metrics for beam in self.beams):
                table.add_row(label, *(_cell(beam.metrics.get(key)) for beam in self.beams))
            elif key.removeprefix("coco_") in self.skipped:
                table.add_row(label, *(["skipped"] * len(self.beams)))
        if any(beam.grounding is not None for beam in self.beams):
            rows = [("pointing game", "pointing"), ("  chance (uniform attention)", "pointing_chance"),
                    ("attention mass in box", "mass"), ("  chance (uniform attention)", "mass_chance")]
            for label, key in rows:
                table.add_row(label, *(_cell(None if b.grounding is None or not b.grounding.n_words
                                             else getattr(b.grounding, key)) for b in self.beams))
            table.add_row("object words scored", *(str(b.grounding.n_words if b.grounding else 0)
                                                   for b in self.beams))
            for label, key in [("mean peak attention per word", "peak"), ("  uniform attention (1/cells)",
                                                                          "peak_uniform")]:
                table.add_row(label, *(_cell(None if b.grounding is None or not b.grounding.n_peak_words
                                             else getattr(b.grounding, key)) for b in self.beams))
        if any(beam.objects is not None for beam in self.beams):
            for label, key in OBJECT_LABELS.items():
                table.add_row(label, *(_cell(None if b.objects is None else getattr(b.objects, key))
                                       for b in self.beams))
        return table


METRIC_LABELS = {
    "bleu1": "BLEU-1 (NLTK)", "bleu2": "BLEU-2 (NLTK)", "bleu3": "BLEU-3 (NLTK)", "bleu4": "BLEU-4 (NLTK)",
    "coco_bleu1": "BLEU-1 (COCO)", "coco_bleu2": "BLEU-2 (COCO)", "coco_bleu3": "BLEU-3 (COCO)",
    "coco_bleu4": "BLEU-4 (COCO)", "coco_meteor": "METEOR", "coco_rouge_l": "ROUGE-L", "coco_cider_d": "CIDEr-D",
}


OBJECT_LABELS = {"object precision": "precision", "object recall": "recall", "exact object set": "exact_set",
                 "CHAIR-i (lower is better)": "chair_i", "CHAIR-s (lower is better)": "chair_s"}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


# How --coco treats the references: "official" is the COCO caption evaluation's protocol (pycocoevalcap's
# COCOEvalCap: the raw reference sentences through the PTB tokenizer), the one behind published tables.
COCO_REFERENCES = {
    "official": "raw reference captions through the PTB tokenizer (COCOEvalCap's protocol)",
    "vocabulary": "reference captions re-tokenised by the vocabulary's rule, then the PTB tokenizer (not the "
                  "official protocol)",
}


def coco_scores(raw_references: list[list[str]], captions: list[list[str]], java: bool = True,
                references: str = "official") -> Any:
    """COCO metrics of vocabulary-word captions (``<unk>`` is one word that matches nothing; PTB would split it
    into ``< unk >``). ``references="official"``: the raw reference sentences go to the PTB tokenizer as
    pycocoevalcap's COCOEvalCap gives them. ``"vocabulary"``: they first go through the rule that built the
    vocabulary (:func:`satcli.data.text.tokenize`, which splits ``t-shirt`` into ``t shirt``), so a caption can
    match what its vocabulary can spell; such numbers do not compare with published ones."""
    if references not in COCO_REFERENCES:
        raise SatcliError(f"--coco-references must be one of {', '.join(COCO_REFERENCES)}, got {references!r}")
    refs = raw_references if references == "official" else \
        [[detokenize(tokenize(c)) for c in captions_of_image] for captions_of_image in raw_references]
    hypotheses = [detokenize(["unk" if w == UNK else w for w in words]) for words in captions]
    return coco_metrics(refs, hypotheses, java=java)


def parse_beam_sizes(text: str) -> tuple[int, ...]:
    """``"1,3,5"`` → ``(1, 3, 5)``; a clear error for anything else."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SatcliError(f"--beam-sizes must be whole numbers separated by commas, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise SatcliError(f"--beam-sizes must be at least 1, got {text!r}")
    return tuple(dict.fromkeys(sizes))


def evaluate(options: EvaluateOptions) -> EvaluateResult:
    """Decode ``options.split`` at every beam size, score it, and write the report and the predictions."""
    started = time.perf_counter()
    if not options.beam_sizes or min(options.beam_sizes) < 1:
        raise SatcliError(f"beam sizes must be at least 1, got {options.beam_sizes}")
    if options.coco_references not in COCO_REFERENCES:
        raise SatcliError(f"--coco-references must be one of {', '.join(COCO_REFERENCES)}, "
                          f"got {options.coco_references!r}")
    try:
        decodings = [DecodingOptions(beam_size=k, max_length=options.max_length,
                                     length_penalty=options.length_penalty, n_best=options.n_best,
                                     no_repeat_ngram_size=options.no_repeat_ngram_size,
                                     min_length=options.min_length, banned_ids=banned_words(options.allow_unk))
                     for k in options.beam_sizes]
    except ValueError as error:
        raise SatcliError(str(error)) from None
    want_bleu = options.bleu or not (options.coco or options.grounding or options.objects)
    model_path = Path(options.model if options.model is not None else default_model())
    device = resolve_device(options.device)
    dataset = StoredDataset.open(options.data_root, options.dataset)
    table = dataset.read(options.split, ["path", "width", "height", "captions", "objects"])
    n_images = table.num_rows
    if n_images == 0:
        raise SatcliError(f"the {options.split!r} split has no images", dataset.path(options.split))
    objects = [objects_from_store(rows) for rows in table.column("objects").to_pylist()]
    if options.grounding and not any(objects):
        raise SatcliError(f"--grounding needs object boxes, and the {options.split!r} split of "
                          f"{dataset.name!r} has none", dataset.path(options.split))
    named_objects = any(r for r in table.column("objects").to_pylist() if any(o.get("words") for o in r))
    if options.objects and not named_objects:
        raise SatcliError(f"--objects needs objects with their words, and the {options.split!r} split of "
                          f"{dataset.name!r} has none (COCO: preprocess with --instances)",
                          dataset.path(options.split))
    lexicon = dataset_lexicon(dataset) if named_objects else {}  # also for the predictions' objects columns
    loaded, model_sha256 = load_captioner_hashed(model_path, device)  # recorded in every predictions file
    out = options.out or model_path.parent / f"evaluate-{dataset.name}-{options.split}"
    members = [load_captioner_hashed(path, device) for path in options.ensemble]
    decoder = ensemble_model(loaded, model_path, [(m, Path(p)) for (m, _), p in zip(members, options.ensemble,
                                                                                    strict=True)])

    outputs = _decode_split(options, dataset, loaded, device, decodings, n_images, decoder)
    words = loaded.vocab.words
    raw_references = table.column("captions").to_pylist()
    references = [[tokenize(c) for c in captions] for captions in raw_references]
    present = [present_objects((o["label"] for o in rows or ()), refs, lexicon)  # CHAIR's: boxes + references
               for rows, refs in zip(table.column("objects").to_pylist(), references, strict=True)] \
        if named_objects else []
    result = EvaluateResult(out / REPORT, [], n_images)
    for decoding, decoded in zip(decodings, outputs, strict=True):
        beam = BeamResult(decoding.beam_size, seconds=decoded.seconds)
        captions = [[words[i] for i in r.tokens] for r in decoded.results]
        if want_bleu:
            beam.metrics.update(bleu(references, captions))
        if options.coco:
            coco = coco_scores(raw_references, captions, java=options.java, references=options.coco_references)
            beam.metrics.update({f"coco_{k}": v for k, v in coco.scores.items()})
            result.coco_backend, result.skipped = coco.backend, coco.skipped
            result.coco_references = options.coco_references
        if options.grounding:
            beam.grounding = grounding_scores(
                (tokens, r.attention.float().numpy(), objs)
                for tokens, r, objs in zip(captions, decoded.results, objects, strict=True))
        if options.objects:
            beam.objects = object_scores(zip(captions, present, strict=True), lexicon)
        scores = per_image_scores(references, captions, present if named_objects else None, lexicon)
        beam.predictions = _write_predictions(out / f"predictions-{options.split}-beam{decoding.beam_size}.parquet",
                                              table, decoded.results, scores, words, decoding.n_best,
                                              _metadata(loaded, model_sha256, decoding, dataset, options.split))
        result.beams.append(beam)
    _write_report(result, options, dataset, loaded, model_path, decodings, time.perf_counter() - started,
                  [(Path(p), sha) for p, (_, sha) in zip(options.ensemble, members, strict=True)])
    return result


def ensemble_model(first: LoadedCheckpoint, first_path: Path,
                   others: list[tuple[LoadedCheckpoint, Path]]) -> torch.nn.Module:
    """``first``'s captioner, or with ``others`` an :class:`Ensemble` of them all; a clear error naming the
    checkpoint that cannot join (a fine-tuned encoder, other preprocessing, vocabulary or sizes)."""
    if not others:
        return first.model
    for loaded, path in [(first, first_path), *others]:
        if loaded.train_options.get("fine_tune_encoder"):
            raise SatcliError("an ensemble's members must keep the pretrained encoder (one feature cache serves "
                              "them all); this checkpoint fine-tuned it", path)
    for loaded, path in others:
        if loaded.vocab.words != first.vocab.words:
            raise SatcliError(f"its vocabulary differs from --model {first_path}'s: ensemble members must be "
                              "trained on the same preprocessed dataset", path)
        if loaded.preprocessing != first.preprocessing:
            raise SatcliError(f"it prepares images unlike --model {first_path} ({loaded.preprocessing} vs "
                              f"{first.preprocessing})", path)
    try:
        return Ensemble([first.model, *(loaded.model for loaded, _ in others)]).eval()
    except ValueError as error:
        raise SatcliError(str(error), others[0][1]) from None


def dataset_lexicon(dataset: StoredDataset) -> Lexicon:
    """Word → labels from the objects of every split, so a word the evaluated split happens to lack still counts."""
    return build_lexicon(rows for split in dataset.splits
                         for rows in dataset.read(split, ["objects"]).column("objects").to_pylist())


def _decode_split(options: EvaluateOptions, dataset: StoredDataset, loaded: Any, device: torch.device,
                  decodings: list[DecodingOptions], n_images: int, decoder: torch.nn.Module) -> list[Decoded]:
    """Every decoding of the split, each batch encoded once for the whole sweep: from the feature cache when the
    encoder was frozen in training (its weights are then the pretrained ones the cache was made with), else by
    running the encoder."""
    with make_progress() as progress:
        task = progress.add_task(f"captioning {dataset.name}/{options.split} at beam "
                                 f"{','.join(str(d.beam_size) for d in decodings)}", total=n_images, unit="images")
        features = None if loaded.train_options.get("fine_tune_encoder") else \
            cached_features(dataset, options.split, loaded.model, device, options.batch_size, data=loaded.preprocessing)
        chunks = split_chunks(dataset, options.split, loaded.model, device, options.batch_size, features,
                              data=loaded.preprocessing)
        return decode_split(decoder, chunks, decodings, device, lambda n: progress.advance(task, n))


def _metadata(loaded: LoadedCheckpoint, model_sha256: str, decoding: DecodingOptions, dataset: StoredDataset,
              split: str) -> dict[str, Any]:
    """A predictions file's metadata: that of any results file (``satcli.images``' root is the folder the store's
    image paths start from, as caption's --root), plus the dataset and split it was made on."""
    return results_metadata(loaded, model_sha256, decoding,
                            image_root=(dataset.meta.get("source") or {}).get("images"),
                            dataset={"name": dataset.name, "split": split, "root": str(dataset.root.absolute())})


def _write_predictions(path: Path, table: Any, results: list[DecodingResult], scores: list[ImageScores],
                       words: list[str], n_best: int, metadata: dict[str, Any]) -> Path:
    """One results row per image of the split (as ``satcli caption`` writes them, plus the image's references
    and own scores), sorted by path."""
    paths, widths, heights, references = (table.column(c).to_pylist() for c in ("path", "width", "height",
                                                                                 "captions"))
    rows = [replace(result_row(p, r, words, n_best, w, h), references=refs, bleu4=s.bleu4, cider_d=s.cider_d,
                    objects_present=s.objects_present, objects_named=s.objects_named)
            for p, w, h, r, refs, s in zip(paths, widths, heights, results, references, scores, strict=True)]
    rows.sort(key=lambda row: row.path)  # satcli results files are sorted by path
    return write_results(path, rows, metadata)


def _write_report(result: EvaluateResult, options: EvaluateOptions, dataset: StoredDataset, loaded: Any,
                  model_path: Path, decodings: list[DecodingOptions], seconds: float,
                  ensemble: list[tuple[Path, str]]) -> None:
    report = {
        "satcli_version": __version__,
        "scale": "0-1 (tables show 0-100); CIDEr-D on COCO's scale",
        "dataset": {"name": dataset.name, "split": options.split, "n_images": result.n_images,
                    "root": str(dataset.root.absolute())},
        "model": {"path": str(model_path.absolute()), "encoder": loaded.model.config.encoder,
                  "attention": getattr(loaded.model.config, "attention", None),
                  "train_options": loaded.train_options, "checkpoint_metrics": loaded.metrics,
                  "ensemble": [{"path": str(p.absolute()), "sha256": sha} for p, sha in ensemble]},
        "decoding": {"beam_sizes": [d.beam_size for d in decodings], "max_length": options.max_length,
                     "length_penalty": options.length_penalty, "n_best": options.n_best,
                     "no_repeat_ngram_size": options.no_repeat_ngram_size, "min_length": options.min_length,
                     "allow_unk": options.allow_unk},
        "coco": None if result.coco_backend is None else {
            "backend": result.coco_backend, "skipped": result.skipped, "references": result.coco_references,
            "protocol": COCO_REFERENCES[result.coco_references or "official"]},
        "results": [{"beam_size": b.beam_size, "metrics": b.metrics,
                     "grounding": None if b.grounding is None else b.grounding.to_dict(),
                     "objects": None if b.objects is None else b.objects.to_dict(),
                     "predictions": b.predictions.name if b.predictions else None,
                     "decode_seconds": round(b.seconds, 3)} for b in result.beams],
        "seconds": round(seconds, 3),
    }
    write_text(result.report, json.dumps(report, indent=2, default=str))
