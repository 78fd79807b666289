#!/usr/bin/env bash
# The teacher-forward race: arenaflow (CUDA build) vs PyTorch transformers, bf16, random
# weights with the real configs of Llama-3.1-8B and gemma-2-9b, the same rows and token
# budget on both sides (benches/teacher_race.py batches exactly as arenaflow does).
#   (a) fixed: 80 rows x 1,024 random tokens (10 batches of 8 x 1,024)
#   (b) sample: 4,000 rows of the real Kaggle sample tokenized (replicated), max length
#       1,024 and 2,000
#
# Here (no GPU):  benches/teacher_race.sh prepare   # device/: binary, inputs, fixtures
# GPU machine:    benches/teacher_race.sh arenaflow [CASES]   # writes $OUT/arenaflow.jsonl
#                 benches/teacher_race.sh torch MODEL ATTN [CASES]   # $OUT/torch-*.jsonl
# Here again:     benches/teacher_race_report.py results/*.jsonl > table
# Two builds side by side (a change against the commit before it), on the GPU machine:
#                 benches/teacher_race.sh versions MODEL BEFORE.xz AFTER.xz [CASES]
#                 # each case runs BEFORE then AFTER; writes $OUT/versions-MODEL.jsonl
# A switch of one build, off and on:  benches/teacher_race.sh switch MODEL ENV=VALUE [CASES]
# CASES default: fixed_1024 sample_1024 sample_2000.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-8192}
CASES_DEFAULT="fixed_1024 sample_1024 sample_2000"

. benches/gpu_env.sh

family() { case $1 in llama) echo llama3;; gemma) echo gemma2;; esac; }
# compare A B A.parquet B.parquet LABEL: the largest logit difference of two runs' outputs.
compare() {
  python3 -c 'import pyarrow.parquet as pq, numpy as np, sys
a, b = (np.array(pq.read_table(p).column("logits").to_pylist()) for p in sys.argv[3:5])
print(f"{sys.argv[5]}: max |{sys.argv[1]} - {sys.argv[2]}| logits {np.abs(a - b).max():.3g} over {len(a)} rows")' "$@"
}
config() { case $1 in llama) echo benches/configs/llama-3.1-8b.json;; gemma) echo benches/configs/gemma-2-9b.json;; esac; }

case ${1:-} in
  prepare)
    scripts/build-cuda.sh
    B=${CARGO_TARGET_DIR:-target}/release/arenaflow
    [ -x "$B" ] || cargo build --release -p arenaflow-engine --bin arenaflow
    PY=${PY:-.venv-ref/bin/python}
    run=$(mktemp -d)
    mkdir -p device/race device/fixtures
    "$B" run plans/prepare.sql --run-dir "$run" >/dev/null
    for m in llama3 gemma2; do
      for L in 1024 2000; do
        "$B" run plans/tokenize.sql --run-dir "$run" --set tokenizer=../shared/tokenizers/$m/tokenizer.json \
          --set model_name=$m --set max_length=$L >/dev/null
        $PY benches/teacher_race_inputs.py sample "$run/tokenize/${m}_blackpearl_${L}_balanced/tokens.parquet" device/race/${m}_sample_$L
      done
    done
    $PY benches/teacher_race_inputs.py fixed device/race/llama3_fixed_1024 --vocab 128256
    $PY benches/teacher_race_inputs.py fixed device/race/gemma2_fixed_1024 --vocab 256000
    $PY - <<'PY'
import json, pyarrow as pa, pyarrow.parquet as pq
for fam in ["llama", "qwen2", "gemma2"]:
    r = json.load(open(f"tests/fixtures/models/{fam}/reference.json"))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(r["rows"]))],
                             "input_ids": pa.array(r["rows"], pa.list_(pa.int32()))}),
                   f"device/fixtures/{fam}.parquet")
PY
    du -sh device
    ;;
  arenaflow)
    unpack
    mkdir -p device/scratch
    for model in llama gemma; do
      for case in ${2:-$CASES_DEFAULT}; do
        f=$(family $model)
        line=$(device/bin/arenaflow logits --model "$(config $model)" --random-weights 0 --dtype bf16 --device cuda:0 \
          --input device/race/${f}_$case.parquet --output device/scratch/out-$model-$case.parquet \
          --max-batch-tokens $BUDGET --warmup | grep '^stats ' | sed 's/^stats //')
        echo "{\"side\": \"arenaflow\", \"model\": \"$model\", \"case\": \"$case\", \"stats\": $line}" | tee -a "$OUT/arenaflow.jsonl"
      done
    done
    ;;
  arenaflow-detail)
    # Where the time goes (--profile: each section synchronised), and candle's composed
    # ops instead of arenaflow's kernels (ARENAFLOW_GPU_KERNELS=off), on the fixed case;
    # the logits of both go to $OUT/fixed_logits.tar for the fused-vs-composed comparison.
    unpack
    mkdir -p device/scratch/fixed
    for model in llama gemma; do
      f=$(family $model)
      for variant in profile composed fused; do
        flags=(--warmup) env=()
        [ $variant = profile ] && flags+=(--profile)
        [ $variant = composed ] && env=(ARENAFLOW_GPU_KERNELS=off)
        line=$(env "${env[@]}" device/bin/arenaflow logits --model "$(config $model)" --random-weights 0 --dtype bf16 \
          --device cuda:0 --input device/race/${f}_fixed_1024.parquet --output device/scratch/fixed/$model-$variant.parquet \
          --max-batch-tokens $BUDGET "${flags[@]}" | grep '^stats ' | sed 's/^stats //')
        echo "{\"side\": \"arenaflow $variant\", \"model\": \"$model\", \"case\": \"fixed_1024\", \"stats\": $line}" | tee -a "$OUT/arenaflow-detail.jsonl"
      done
    done
    tar -C device/scratch/fixed -cf "$OUT/fixed_logits.tar" .
    ;;
  versions)
    model=$2 f=$(family $2)
    unpack "$3" device/bin/before
    unpack "$4" device/bin/after
    mkdir -p device/scratch
    for case in ${5:-$CASES_DEFAULT}; do
      for side in before after; do
        line=$(device/bin/$side logits --model "$(config $model)" --random-weights 0 --dtype bf16 --device cuda:0 \
          --input device/race/${f}_$case.parquet --output device/scratch/out-$side-$model-$case.parquet \
          --max-batch-tokens $BUDGET --warmup | grep '^stats ' | sed 's/^stats //')
        echo "{\"side\": \"arenaflow $side\", \"model\": \"$model\", \"case\": \"$case\", \"stats\": $line}" | tee -a "$OUT/versions-$model.jsonl"
      done
      compare before after device/scratch/out-before-$model-$case.parquet \
        device/scratch/out-after-$model-$case.parquet "$model $case" | tee -a "$OUT/versions-$model.txt"
    done
    ;;
  switch)
    # One build with and without a switch (e.g. ARENAFLOW_ADD_NORM=off), side by side, each
    # case off then on; the logits of both compared. Writes $OUT/switch-MODEL.jsonl.
    model=$2 f=$(family $2) switch=$3
    unpack
    mkdir -p device/scratch
    for case in ${4:-$CASES_DEFAULT}; do
      for side in off on; do
        env=()
        [ $side = on ] && env=("$switch")
        line=$(env "${env[@]}" device/bin/arenaflow logits --model "$(config $model)" --random-weights 0 --dtype bf16 \
          --device cuda:0 --input device/race/${f}_$case.parquet --output device/scratch/out-$side-$model-$case.parquet \
          --max-batch-tokens $BUDGET --warmup | grep '^stats ' | sed 's/^stats //')
        echo "{\"side\": \"arenaflow $switch $side\", \"model\": \"$model\", \"case\": \"$case\", \"stats\": $line}" | tee -a "$OUT/switch-$model.jsonl"
      done
      compare off on device/scratch/out-off-$model-$case.parquet \
        device/scratch/out-on-$model-$case.parquet "$model $case $switch" | tee -a "$OUT/switch-$model.txt"
    done
    ;;
  torch)
    model=$2 attn=$3
    for case in ${4:-$CASES_DEFAULT}; do
      f=$(family $model)
      line=$(python3 benches/teacher_race.py --config "$(config $model)" --attn $attn \
        --rows device/race/${f}_$case.npz --max-batch-tokens $BUDGET --label $case)
      echo "{\"side\": \"torch $attn\", \"model\": \"$model\", \"case\": \"$case\", \"stats\": $line}" | tee -a "$OUT/torch-$model-$attn.jsonl"
    done
    ;;
  *)
    sed -n 2,17p "$0"
    exit 2
    ;;
esac
