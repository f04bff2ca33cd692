"""Did a change leave the demo as it was? Compares two ``satcli demo`` folders run from two trees on the same seed.

Not a timing: the check behind a refactor's "same scores, same rows". Run the demo from each tree into its own
folder (same options, separate data roots so each makes its own feature cache), then compare:

    cd /tmp/a && PYTHONPATH=OLD_TREE python -m satcli demo --epochs 2 --device cpu --data-root data --out runs \
        > stdout.txt 2> stderr.txt
    cd /tmp/b && PYTHONPATH=NEW_TREE python -m satcli demo --epochs 2 --device cpu --data-root data --out runs \
        > stdout.txt 2> stderr.txt
    python -m bench.compare_demos /tmp/a /tmp/b

It compares metrics.jsonl (timings aside), the scores in both report.json files (test and held-out), every row of
the three Parquet files the demo writes, and the score tables printed on stderr (speed columns aside).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq

TIMINGS = ("seconds", "samples_per_s", "tokens_per_s", "decode_seconds")
PARQUETS = ("runs/test_captions.parquet", "runs/predictions-test-beam3.parquet",
            "runs/evaluate-heldout/predictions-heldout-beam3.parquet")
REPORTS = ("runs/report.json", "runs/evaluate-heldout/report.json")


def metrics(folder: Path) -> list[dict]:
    lines = (folder / "runs/metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def scores(report: Path) -> tuple:
    found = json.loads(report.read_text())
    results = [{k: v for k, v in r.items() if k not in TIMINGS} for r in found["results"]]
    return results, found.get("coco"), found.get("decoding")


def score_tables(folder: Path) -> list[str]:
    """The table rows printed on stderr, without progress lines or the epoch table's speed columns."""
    rows = []
    for line in (folder / "stderr.txt").read_text().splitlines():
        if "│" not in line or re.search(r"captions/s|images/s|\d+:\d\d", line):
            continue
        cells = line.split("│")
        rows.append("│".join(cells[:4]) if len(cells) == 7 else line)  # epoch table: captions/s, seconds
    return rows


def compare(a: Path, b: Path) -> bool:
    checks = [("metrics.jsonl (timings aside)", metrics(a) == metrics(b))]
    checks += [(f"{r} scores", scores(a / r) == scores(b / r)) for r in REPORTS]
    for name in PARQUETS:
        ta, tb = pq.read_table(a / name), pq.read_table(b / name)
        checks.append((f"{name}: columns", ta.column_names == tb.column_names))
        checks.append((f"{name}: all {ta.num_rows} rows", ta.to_pylist() == tb.to_pylist()))
    checks.append(("score tables on stderr (speeds aside)", score_tables(a) == score_tables(b)))
    for name, same in checks:
        print(f"{'same' if same else 'DIFFERENT'}: {name}")
    return all(same for _, same in checks)


if __name__ == "__main__":
    same = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("ALL SAME" if same else "SOME DIFFER")
    sys.exit(0 if same else 1)
