#!/usr/bin/env bash
# The main job on the offline tiny setting (CPU, no network): sets up .venv on first use, writes the
# tiny tokenizer and datasets, then runs the pipeline. Outputs go to runs/tiny/.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m tiny --out data/tiny
python sft.py --preset tiny --output_dir runs/tiny/sft-strong --num_train_epochs 3
python -m tiny.evaluate --models runs/tiny/sft-strong --out runs/tiny/eval.json
