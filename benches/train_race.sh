#!/usr/bin/env bash
# The training baseline race (issue 12, point 10): arenaflow's `distill_step` (CUDA build,
# candle's composed ops and autograd, per-layer checkpointing) vs transformers + PEFT +
# torch (sdpa, gradient checkpointing), bf16 base with random weights and the real
# Llama-3.1-8B config, LoRA r = 64, alpha = 128 on all seven projections, dropout 0,
# AdamW, 8 rows x 1,024 random tokens per step, the same rows on both sides. Both sides in
# mixed precision: torch under torch.autocast(bf16), arenaflow with --lora-autocast (the
# LoRA matmuls in bf16 from f32 weights; before 2026-12-04's third session arenaflow ran
# them in f32, PEFT's order without autocast).
#
# Here (no GPU):  benches/train_race.sh prepare        # device/train_race/: inputs
#                 (and scripts/build-cuda.sh for device/arenaflow.xz, carried, or
#                 staged by benches/gpu_recipe.sh stage)
# GPU machine:    benches/train_race.sh arenaflow       # $OUT/train-arenaflow.txt
#                 benches/train_race.sh torch           # $OUT/train-torch.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-6}

case ${1:-} in
  prepare)
    PY=${PY:-.venv-ref/bin/python}
    mkdir -p device/train_race
    $PY - <<'PY'
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(0)
rows = [rng.integers(1, 128000, 1024).astype(np.int32) for _ in range(64)]
labels = rng.integers(0, 3, len(rows)).astype(np.int32)
np.savez_compressed("device/train_race/llama3.npz", lengths=np.array([1024] * len(rows), np.int32), tokens=np.concatenate(rows))
pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(rows))],
                         "input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32())),
                         "label": pa.array(labels)}), "device/train_race/llama3.parquet")
PY
    ls -l device/train_race
    ;;
  arenaflow)
    . benches/gpu_env.sh
    arenaflow_bin
    rm -rf device/scratch/adapter-llama
    mkdir -p device/scratch
    "$bin" train --model benches/configs/llama-3.1-8b.json --random-weights 0 \
      --input device/train_race/llama3.parquet --output device/scratch/adapter-llama \
      --dtype bf16 --device cuda:0 --lora-r 64 --lora-alpha 128 --lora-dropout 0 \
      --lora-autocast --batch-rows 8 --max-batch-tokens 8192 --max-steps "$STEPS" --gradient-checkpointing \
      --no-shuffle --checkpoint-every 0 --lr 1e-4 --adam-beta2 0.95 --warmup-steps 0 \
      2>&1 | tee "$OUT/train-arenaflow.txt"
    ;;
  torch)
    python3 benches/train_race.py --config benches/configs/llama-3.1-8b.json --attn sdpa \
      --rows device/train_race/llama3.npz --steps $((STEPS - 1)) --r 64 --alpha 128 \
      --label llama_8x1024 | tee -a "$OUT/train-torch.jsonl"
    ;;
  *)
    echo "usage: $0 prepare | arenaflow | torch" >&2
    exit 2
    ;;
esac
