#!/usr/bin/env bash
# The main job on the offline tiny setting (CPU, no network), calling only the scripts' command lines:
#   1. the tiny tokenizer, data and random-init weak / strong Qwen2 (python -m tiny);  2. weak and strong SFT (sft.py);
#   3. weak DPO (dpo.py);  4. strong alignment: WSPO from the weak pair (wspo.py), and as references
#   DPO (the strong ceiling) and WPO;  5. every model evaluated the same way (tiny/evaluate.py);
#   6. a table, a PNG plot and the fraction of the alignment gap WSPO recovers.
# Creates .venv on first use (set USE_CURRENT_PYTHON=1 to use the active environment instead).
# Every stage's settings are its recipe in recipes/tiny/. Knobs for a quicker run: OUT, SFT_EPOCHS (both SFTs; the
# recipes train the weak model 6 epochs, the strong 3), N_PROMPTS, SAMPLES. A second run into the same OUT is refused (each
# script protects its output folder); OVERWRITE=1 replaces the earlier run's models and metrics.
# Seeds: SEED=N (default 1) seeds the models' initialisation, every stage's training and the evaluation's sampling
# (the tiny data stay fixed);
# SEEDS="1 2 3 4 5" runs the pipeline once per seed into OUT/seed-N, then tiny/seeds.py writes the table over seeds
# (mean +- std, minimum, per seed, and whether each claimed ordering holds in every seed) and the plot.
set -euo pipefail
cd "$(dirname "$0")"
SELF="$PWD/$(basename "$0")"
if [ "${USE_CURRENT_PYTHON:-0}" != 1 ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
  fi
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-runs/tiny}; DATA=${DATA:-data/tiny}
N_PROMPTS=${N_PROMPTS:-200}; SAMPLES=${SAMPLES:-4}; SEED=${SEED:-1}
over=()
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  if [ "${OVERWRITE:-0}" != 1 ]; then
    echo "error: $OUT already holds a run; set OVERWRITE=1 to replace it, or OUT=another/folder" >&2; exit 2
  fi
  over=(--overwrite_output_dir)
fi
if [ -n "${SEEDS:-}" ]; then
  runs=()
  for s in $SEEDS; do
    SEEDS="" SEED="$s" OUT="$OUT/seed-$s" USE_CURRENT_PYTHON=1 bash "$SELF"
    runs+=("$OUT/seed-$s")
  done
  python -m tiny.seeds --runs "${runs[@]}" --out "$OUT/results.json" --table "$OUT/results.md" --plot "$OUT/results.png"
  echo "results over seeds $SEEDS in $OUT/results.md and $OUT/results.png"
  exit 0
fi
# every stage's settings are its recipe in recipes/tiny/; here only the seed and the folders of this run are passed
common=(--seed "$SEED" --cache_dir "$OUT/cache" "${over[@]}")
epochs=(); [ -z "${SFT_EPOCHS:-}" ] || epochs=(--num_train_epochs "$SFT_EPOCHS")  # quick runs: fewer SFT epochs
t0=$(date +%s)

python -m tiny --out "$DATA" --no_images --models lm --init_seed "$SEED"
python sft.py --config recipes/tiny/sft-weak.yaml --seed "$SEED" --dataset_name "$DATA/ultrachat" --tokenizer_name "$DATA/tokenizer" \
  --model_name_or_path "$DATA/models/qwen2-weak-init$SEED" --output_dir "$OUT/sft-weak" "${epochs[@]}" "${over[@]}"
python sft.py --config recipes/tiny/sft-strong.yaml --seed "$SEED" --dataset_name "$DATA/ultrachat" --tokenizer_name "$DATA/tokenizer" \
  --model_name_or_path "$DATA/models/qwen2-strong-init$SEED" --output_dir "$OUT/sft-strong" "${epochs[@]}" "${over[@]}"
python dpo.py --config recipes/tiny/dpo.yaml "${common[@]}" --dataset_name "$DATA/ultrafeedback" --model_name_or_path "$OUT/sft-weak" \
  --output_dir "$OUT/dpo-weak"
python wspo.py --config recipes/tiny/wspo.yaml "${common[@]}" --dataset_name "$DATA/ultrafeedback" --strong "$OUT/sft-strong" \
  --weak_ref "$OUT/sft-weak" --weak_aligned "$OUT/dpo-weak" --output_dir "$OUT/wspo-strong"
python dpo.py --config recipes/tiny/dpo.yaml "${common[@]}" --dataset_name "$DATA/ultrafeedback" --model_name_or_path "$OUT/sft-strong" \
  --output_dir "$OUT/dpo-strong"
python wpo.py --config recipes/tiny/wpo.yaml "${common[@]}" --dataset_name "$DATA/ultrafeedback" --model_name_or_path "$OUT/sft-strong" \
  --output_dir "$OUT/wpo-strong"
python -m tiny.evaluate --data "$DATA/ultrafeedback" --n_prompts "$N_PROMPTS" --samples "$SAMPLES" --seed "$SEED" \
  --names "weak SFT" "weak DPO" "strong SFT" "strong WSPO" "strong DPO" "strong WPO" \
  --models "$OUT/sft-weak" "$OUT/dpo-weak" "$OUT/sft-strong" "$OUT/wspo-strong" "$OUT/dpo-strong" "$OUT/wpo-strong" \
  --refs none "$OUT/sft-weak" none "$OUT/sft-strong" "$OUT/sft-strong" "$OUT/sft-strong" \
  --out "$OUT/results.json" --table "$OUT/results.md" --plot "$OUT/results.png"
echo "main job done in $(( $(date +%s) - t0 )) s; results in $OUT/results.md and $OUT/results.png"
