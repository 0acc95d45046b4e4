#!/usr/bin/env bash
# The GPU benchmark in one command (run from the repository root on the device machine, within its
# 10-minute limit). Installs the carried wheels, made by benchmarks/fetch_wheels.sh (.whl/: what the device lacks;
# .whl/transformers/: the project's pinned transformers + tokenizers, used only if they import cleanly there), runs
#   python benchmarks/bench.py --gpu --budget_s B --steps 20
# (Qwen2-0.5B config, bf16 autocast, batch 8 pairs; runs ordered by importance, the tail dropped when the time
# budget runs out, every run under its own timeout), and writes everything into ONE file: $OUT/bench-gpu.tar.gz
# (report benchmarks.md, results.json, each run's log, metrics.jsonl and args.json; no models).
#
# Knobs (environment): GPU_RUN_TOTAL_S (default 560: the whole script's budget, seconds), BENCH_STEPS (20),
# BENCH_ARGS (extra bench.py flags, e.g. "--sizes qwen2-0.5b qwen2-1.5b", or "--tiny" for a dry run on a CPU),
# GPU_RUN_PIP_EXTRA (extra pip flags; the CPU dry run here passes "--python-version 3.12 --only-binary=:all:").
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-run-out}
TOTAL=${GPU_RUN_TOTAL_S:-560}
W=/tmp/w2s-gpu-run
rm -rf "$W" && mkdir -p "$W" "$OUT"
exec > >(tee "$W/gpu_run.log") 2>&1
echo "[gpu_run] $(date -u) in $(pwd), OUT=$OUT, budget ${TOTAL} s"

PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade ${GPU_RUN_PIP_EXTRA:-}"
$PIP --target /tmp/site .whl/*.whl || echo "[gpu_run] pip install of .whl/*.whl FAILED"
export PYTHONPATH=/tmp/site
if ls .whl/transformers/*.whl >/dev/null 2>&1; then
    $PIP --target /tmp/site-tf .whl/transformers/*.whl || echo "[gpu_run] pip install of .whl/transformers FAILED"
    if PYTHONPATH=/tmp/site-tf:/tmp/site python3 -c "import transformers, trl, datasets, tyro, accelerate, peft; from transformers import Qwen2Tokenizer, AutoModelForCausalLM" >"$W/import-check.log" 2>&1; then
        export PYTHONPATH=/tmp/site-tf:/tmp/site
    else
        echo "[gpu_run] the carried transformers does not import here (see import-check.log); using the device's"
    fi
fi
python3 - <<'EOF'
import importlib, sys
print("[gpu_run] python", sys.version.split()[0])
for m in ("torch", "transformers", "tokenizers", "huggingface_hub", "trl", "datasets", "accelerate", "peft", "tyro"):
    try:
        mod = importlib.import_module(m)
        print(f"[gpu_run] {m} {mod.__version__} {mod.__file__}")
    except Exception as e:
        print(f"[gpu_run] {m}: IMPORT FAILED: {e!r}")
import torch
print("[gpu_run] cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
nvidia-smi || true

ELAPSED=$(( $(date +%s) - T0 ))
BUDGET=$(( TOTAL - ELAPSED - 25 ))  # 25 s for the report, the tar and the way back
echo "[gpu_run] setup took ${ELAPSED} s; benchmark budget ${BUDGET} s"
timeout -k 5 $(( BUDGET + 10 )) python3 benchmarks/bench.py --gpu --budget_s "$BUDGET" --steps "${BENCH_STEPS:-20}" \
    --run_timeout_s 150 --workdir "$W/bench" ${BENCH_ARGS:-}
echo "[gpu_run] bench.py exit code $? after $(( $(date +%s) - T0 )) s"

cd "$W" && tar czf "$OUT/bench-gpu.tar.gz" --exclude='*/models' --exclude='*/cache' --exclude='*.safetensors' \
    --exclude='*tokenizer*' --exclude='*.jsonl.lock' . && ls -la "$OUT"
echo "[gpu_run] done after $(( $(date +%s) - T0 )) s"
