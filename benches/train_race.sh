#!/usr/bin/env bash
# The training race (issue 15, point 3): arenaflow's `train` (CUDA build, `distill_step`)
# vs transformers + PEFT + torch, side by side on one GPU machine, the same rows in the same
# order. bf16 base with random weights and the real configs of Llama-3.1-8B and
# gemma-2-9b, LoRA r = 64, alpha = 128 on all seven projections (score head trained),
# dropout 0, AdamW (0.9, 0.95), clipping 1.0, gradient checkpointing on both sides, 8 rows
# per optimizer step. Both sides in mixed precision: torch under torch.autocast(bf16),
# arenaflow with --lora-autocast (the LoRA matmuls in bf16 from f32 weights). torch's
# attention: sdpa for Llama; eager for Gemma-2 (the faithful soft-capped attention; sdpa
# drops the soft-cap, noted as unfaithful).
#   fixed:  8 x 1,024 random tokens a step (64 rows, cycled)
#   sample: the real Kaggle sample tokenized at max length 1,024 (balanced truncation,
#           plans/tokenize.sql), its `ab` rows replicated to 4,000 in file order; each step
#           8 consecutive rows padded to the longest (both sides), tokens counted unpadded
# Each side times steps 2..STEPS (the first is the warm-up); the report divides the tokens
# of those steps by their seconds.
#
# Here (no GPU):  benches/train_race.sh prepare          # device/train_race/: inputs
#                 (and scripts/build-cuda.sh for device/arenaflow.xz, carried, or staged
#                 by benches/gpu_recipe.sh stage)
# GPU machine:    benches/train_race.sh arenaflow MODEL CASE   # $OUT/train-arenaflow-MODEL-CASE.txt
#                 benches/train_race.sh torch MODEL CASE       # $OUT/train-torch.jsonl (appends)
#                 benches/train_race.sh all [MODELS] [CASES]   # both sides of every pair
# Here again:     benches/train_race_report.py DIR             # the table, utilisation included
# MODEL: llama | gemma; CASE: fixed | sample. STEPS (default 6 for fixed, 21 for sample).
set -euo pipefail
cd "$(dirname "$0")/.."

family() { case $1 in llama) echo llama3;; gemma) echo gemma2;; *) echo "model: llama or gemma, not '$1'" >&2; exit 2;; esac; }
config() { echo "benches/configs/$(case $1 in llama) echo llama-3.1-8b;; gemma) echo gemma-2-9b;; esac).json"; }
torch_attn() { case $1 in llama) echo sdpa;; gemma) echo eager;; esac; }
steps() { echo "${STEPS:-$(case $1 in fixed) echo 6;; sample) echo 21;; *) echo "case: fixed or sample, not '$1'" >&2; exit 2;; esac)}"; }

case ${1:-} in
  prepare)
    PY=${PY:-.venv-test/bin/python}
    B=${ARENAFLOW:-${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}/debug/arenaflow}
    [ -x "$B" ] || { echo "no arenaflow binary at $B (cargo build, or set ARENAFLOW)" >&2; exit 1; }
    run=$(mktemp -d)
    trap 'rm -rf "$run"' EXIT
    mkdir -p device/train_race
    "$B" run plans/prepare.sql --run-dir "$run" >/dev/null
    for f in llama3 gemma2; do
      "$B" run plans/tokenize.sql --run-dir "$run" --set tokenizer=../shared/tokenizers/$f/tokenizer.json \
        --set model_name=$f --set max_length=1024 >/dev/null
      $PY benches/teacher_race_inputs.py sample "$run/tokenize/${f}_blackpearl_1024_balanced/tokens.parquet" \
        device/train_race/${f}_sample --rows 4000 --labels
    done
    $PY benches/teacher_race_inputs.py fixed device/train_race/llama3_fixed --vocab 128256 --rows 64 --labels
    $PY benches/teacher_race_inputs.py fixed device/train_race/gemma2_fixed --vocab 256000 --rows 64 --labels
    du -sh device/train_race
    ;;
  arenaflow)
    model=${2:?model}; case=${3:?case}; f=$(family "$model"); n=$(steps "$case")
    . benches/gpu_env.sh
    arenaflow_bin
    rm -rf "device/scratch/adapter-$model"
    mkdir -p device/scratch
    "$bin" train --model "$(config "$model")" --random-weights 0 \
      --input "device/train_race/${f}_$case.parquet" --output "device/scratch/adapter-$model" \
      --dtype bf16 --device cuda:0 --lora-r 64 --lora-alpha 128 --lora-dropout 0 \
      --lora-autocast --batch-rows 8 --max-batch-tokens 8192 --max-steps "$n" --gradient-checkpointing \
      --no-shuffle --checkpoint-every 0 --lr 1e-4 --adam-beta2 0.95 --warmup-steps 0 \
      2>&1 | tee "$OUT/train-arenaflow-$model-$case.txt"
    ;;
  torch)
    model=${2:?model}; case=${3:?case}; f=$(family "$model"); n=$(steps "$case")
    python3 benches/train_race.py --config "$(config "$model")" --attn "$(torch_attn "$model")" \
      --rows "device/train_race/${f}_$case.npz" --steps $((n - 1)) --r 64 --alpha 128 \
      --label "${model}_$case" | tee -a "$OUT/train-torch.jsonl"
    ;;
  all)
    for model in ${2:-llama gemma}; do
      for case in ${3:-fixed sample}; do
        "$0" arenaflow "$model" "$case" | tail -n 3
        "$0" torch "$model" "$case"
      done
    done
    ;;
  *)
    echo "usage: $0 prepare | arenaflow MODEL CASE | torch MODEL CASE | all [MODELS] [CASES]" >&2
    exit 2
    ;;
esac
