"""Recognition across appearance: one training recipe scored on both held-out sets, side by side.

- **shapes heldout**: satcli's own generator draws the test's shapes outlined, hatched, shaded and turned, as no
  training picture is (docs/datasets.md); the shapes **test** split (same look as training) rides along, for the
  in-distribution BLEU-4 / CIDEr-D a lever must not lose.
- **emoji test**: scenes of real drawings (../shared/benchmarks/emoji_scenes.py: 40 everyday classes drawn by the
  emoji vendors' designers; training scenes Google's and Twitter's drawings, validation and test scenes only
  Facebook's, a style training never shows).

For each dataset and seed it runs, as a user would, `satcli preprocess` (once), `satcli train` with the recipe
(the demo's, ``satcli.commands.demo.demo_train_options``, unless ``--recipe`` names flags of its own) plus any
extra flags after ``--``, and `satcli evaluate --objects --grounding` at beam 3, then prints object precision /
recall, exact set, CHAIR-i/-s, BLEU-4, CIDEr-D, the pointing game and the CPU time (user + sys) of training:

    python -m bench.recognition --work /tmp/recognition --seeds 0,1,2
    python -m bench.recognition --work /tmp/recognition --name shifts -- --feature-shifts   # a lever row
    python -m bench.recognition --work /tmp/recognition --seeds 0,1,2 --ensemble     # + the seeds as one model
    python -m bench.recognition --work /tmp/recognition --decode "--no-repeat-ngram 2"   # a decoding lever
    python -m bench.recognition --work /tmp/recognition --name scst --scst-from default -- --epochs 2 --scst-lr 1e-4

``--ensemble`` adds a row per set for the seeds' models decoded as one (`satcli evaluate --ensemble`), its CPU
time the sum of theirs. ``--decode`` passes flags to every `satcli evaluate` (runs already trained are reused, so
a decoding lever costs no training); its scores go to their own evaluation folders and scores file.
``--scst-from NAME`` makes the row a second stage: each seed's run is `satcli train --scst --init` from the
best.pt of row NAME's run of the same dataset and seed (the flags after ``--`` are SCST's; the recipe is not
passed), and its CPU time is the SCST stage's alone.

The emoji pictures are fetched from the npm registry by the benchmark script into ~/.cache/emoji-scenes (once)
and stay out of git. Give training one thread when anything else runs (``OMP_NUM_THREADS=1``): the CPU time is
then comparable across rows; wall time on a shared 2-core machine is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from bench.common import command, machine

REPO = Path(__file__).resolve().parent.parent
EMOJI_SCRIPT = REPO.parent / "shared" / "benchmarks" / "emoji_scenes.py"
# dataset → the splits scored (the first is the held-out one the lever is judged on)
SPLITS = {"shapes": ("heldout", "test"), "emoji": ("test",)}
COLUMNS = {"object P": "objects_precision", "object R": "objects_recall", "exact set": "objects_exact_set",
           "CHAIR-i": "objects_chair_i", "CHAIR-s": "objects_chair_s", "BLEU-4": "bleu4",
           "CIDEr-D": "coco_cider_d", "pointing": "grounding_pointing"}


def demo_recipe() -> list[str]:
    """The demo's training recipe as `satcli train` flags: every option where it differs from train's default."""
    from satcli.commands.demo import DemoOptions, demo_train_options
    from satcli.training.options import TrainOptions

    recipe = demo_train_options(DemoOptions())
    flags = []
    for field in fields(TrainOptions):
        if field.name in ("dataset", "data_root", "out", "overwrite", "seed", "device", "given", "resume"):
            continue
        value = getattr(recipe, field.name)
        default = field.default if field.default is not MISSING else None
        if value == default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + field.name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def satcli(*args: str) -> str:
    """Run ``satcli ARGS`` as a user would; its stdout (the --json line), or exit with its error."""
    done = subprocess.run([sys.executable, "-m", "satcli", *args], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"satcli {' '.join(args)} failed with exit code {done.returncode}")
    return done.stdout


def prepare(work: Path, emoji_script: Path) -> Path:
    data = work / "data"
    if not (data / "shapes" / "meta.json").exists():
        satcli("preprocess", "--dataset", "shapes", "--data-root", str(data), "-q")
    source = work / "emoji-scenes"
    if not (source / "dataset_emoji.json").exists():
        subprocess.run([sys.executable, str(emoji_script), str(source)], check=True)
    if not (data / "emoji" / "meta.json").exists():
        satcli("preprocess", "--dataset", "karpathy", "--images", str(source / "images"), "--captions",
               str(source / "dataset_emoji.json"), "--name", "emoji", "--data-root", str(data), "-q")
    return data


def train(data: Path, dataset: str, out: Path, seed: int, flags: list[str]) -> float:
    """Train unless ``out/best.pt`` exists already; the CPU seconds (user + sys) training took (0 if reused)."""
    if (out / "best.pt").exists() and (out / "cpu_seconds").exists():
        return float((out / "cpu_seconds").read_text())
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    satcli("train", "--dataset", dataset, "--data-root", str(data), "--out", str(out), "--overwrite",
           "--seed", str(seed), "-q", *flags)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    (out / "cpu_seconds").write_text(f"{seconds:.1f}\n")
    return seconds


def evaluate(data: Path, dataset: str, split: str, model: Path, decode: list[str], tag: str,
             ensemble: list[Path] | None = None, out: Path | None = None) -> dict[str, float]:
    members = [arg for path in ensemble or [] for arg in ("--ensemble", str(path))]
    folder = (out or model.parent) / f"evaluate-{dataset}-{split}{tag}"
    line = satcli("evaluate", "--model", str(model), *members, "--dataset", dataset, "--data-root", str(data),
                  "--split", split, "--beam-size", "3", "--bleu", "--coco", "--no-java", "--objects", "--grounding",
                  "--max-length", "30", *decode, "--out", str(folder), "--json", "-q")
    report = json.loads(line)
    beam = report["results"][0]
    scores = dict(beam.get("metrics", {}))
    scores.update({f"objects_{k}": v for k, v in (beam.get("objects") or {}).items()})
    scores.update({f"grounding_{k}": v for k, v in (beam.get("grounding") or {}).items()})
    return scores


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the datasets, runs and scores")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--name", default="default", help="the row's name (its runs go to WORK/runs/NAME-...)")
    parser.add_argument("--recipe", default=None, help="train flags instead of the demo's recipe (one string)")
    parser.add_argument("--datasets", default="shapes,emoji")
    parser.add_argument("--emoji-script", type=Path, default=EMOJI_SCRIPT)
    parser.add_argument("--ensemble", action="store_true", help="also score the seeds' models as one ensemble")
    parser.add_argument("--decode", default="", help="flags for every satcli evaluate (one string)")
    parser.add_argument("--scst-from", default=None, metavar="NAME",
                        help="SCST second stage from row NAME's models (flags after -- are SCST's)")
    args = parser.parse_args(argv)
    decode = args.decode.split()
    tag = "".join(f"-{part.lstrip('-')}" for part in decode)  # e.g. -no-repeat-ngram-2
    flags = (args.recipe.split() if args.recipe is not None else demo_recipe()) + extra
    if args.scst_from is not None:
        flags = ["--scst", "--init", f"{args.work}/runs/{args.scst_from}-DATASET-seedN/best.pt", *extra]
    data = prepare(args.work, args.emoji_script)
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for dataset in args.datasets.split(","):
        models, cpus = [], []
        for seed in seeds:
            out = args.work / "runs" / f"{args.name}-{dataset}-seed{seed}"
            if args.scst_from is not None:
                start = args.work / "runs" / f"{args.scst_from}-{dataset}-seed{seed}" / "best.pt"
                if not start.exists():
                    raise SystemExit(f"{start}: no such model; run the row {args.scst_from!r} first")
                cpus.append(train(data, dataset, out, seed, ["--scst", "--init", str(start), *extra]))
            else:
                cpus.append(train(data, dataset, out, seed, flags))
            models.append(out / "best.pt")
            for split in SPLITS[dataset]:
                scores = evaluate(data, dataset, split, out / "best.pt", decode, tag)
                rows.append((f"{dataset} {split}", str(seed), scores, cpus[-1]))
        if args.ensemble and len(models) > 1:
            out = args.work / "runs" / f"{args.name}-{dataset}-ensemble{'+'.join(map(str, seeds))}"
            for split in SPLITS[dataset]:
                scores = evaluate(data, dataset, split, models[0], decode, tag, models[1:], out)
                rows.append((f"{dataset} {split}", "+".join(map(str, seeds)), scores, sum(cpus)))
    print(f"command: {command()}\nmachine: {machine()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(f"train flags: {' '.join(flags)}" + (f"; evaluate flags: {args.decode}" if decode else "") + "\n")
    print("| set | seed | " + " | ".join(COLUMNS) + " | train CPU s |")
    print("|---|---:|" + "---:|" * (len(COLUMNS) + 1))
    for name, seed, scores, cpu in rows:
        cells = [f"{100 * scores[key]:.1f}" if key in scores else "–" for key in COLUMNS.values()]
        print(f"| {name} | {seed} | " + " | ".join(cells) + f" | {cpu:.0f} |")
    json.dump([{"set": n, "seed": s, "scores": sc, "train_cpu_seconds": c} for n, s, sc, c in rows],
              (args.work / f"scores-{args.name}{tag}.json").open("w"), indent=1)


if __name__ == "__main__":
    main()
