#!/usr/bin/env bash
# The real training run of issue 12 (point 12): SmolLM2-135M-Instruct (the Q4_1 GGUF of
# scripts/fetch-smollm2.sh, dequantized to bf16) fine-tuned as a teacher by
# plans/train_teacher.sql on folds of the real Kaggle sample, on a GPU, with the settings
# of the torch + PEFT reference of issue 14 (LoRA r 16, alpha 32 on all linear layers,
# dropout 0.05, 2 epochs, lr 2e-4 cosine with 10% warm-up, batch 16, AdamW (0.9, 0.95),
# the blackpearl template with balanced truncation at 512 tokens, swapped copies on the
# training side). Evaluates fold k's held-out side before the first step (the untrained
# head) and every 50 steps.
#
# Here (no GPU):  scripts/fetch-smollm2.sh; scripts/build-cuda.sh
#                 arenaflow run plans/prepare.sql plans/folds.sql --run-dir device/smol/run
# GPU machine:    benches/smol_teacher.sh GGUF RUN_DIR FOLD...   # $OUT/smol-fold{k}.txt
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
unpack
gguf=$1 run=$2
shift 2
for fold in "$@"; do
  device/bin/arenaflow run plans/train_teacher.sql --run-dir "$run" \
    --set model="$gguf" --set tokenizer="$gguf" --set model_name=smollm2 --set fold="$fold" \
    --set max_length=512 --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0.05 \
    --set epochs=2 --set lr=0.0002 --set schedule=cosine --set warmup_ratio=0.1 \
    --set batch_rows=16 --set adam_beta1=0.9 --set adam_beta2=0.95 --set dtype=bf16 \
    --set device=cuda:0 --set eval_every=50 --set checkpoint_every=100 \
    2>&1 | tee "${OUT:-.}/smol-fold$fold.txt"
  cp "$run/train/smollm2/fold$fold/loss.png" "${OUT:-.}/smol-fold$fold-loss.png" || true
done
