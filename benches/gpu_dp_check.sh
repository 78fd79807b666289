#!/usr/bin/env bash
# Data-parallel training on one GPU (issue 17, point 1, what one lent H200 can show): the
# race's Llama-3.1-8B shape (random weights, benches/train_race.sh prepare's rows), LoRA
# r 16, bf16, autocast, 4 steps of 8 rows x 1,024 tokens: `arenaflow train` alone, then two
# ranks of one command line under torchrun's variables, both on cuda:0 (one GPU holds two
# 8B replicas). Prints the largest difference between the two adapters (relative to each
# tensor's largest value) and each run's tokens/s: the ranks' gradients are summed through
# the host over TCP (NCCL, which two GPUs would use, refuses two ranks on one GPU), so the
# second figure is the cost of that sum, not a scaling figure. Carry device/arenaflow.xz and device/train_race.
#
#   benches/gpu_dp_check.sh        # $OUT/dp-check.txt
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
arenaflow_bin
OUT=${OUT:-/tmp}
work=$(mktemp -d)
args=(train --model benches/configs/llama-3.1-8b.json --random-weights 0
  --input device/train_race/llama3_fixed.parquet --dtype bf16 --lora-r 16 --lora-alpha 32
  --lora-dropout 0 --lora-autocast --batch-rows 8 --max-batch-tokens 8192 --max-steps 4
  --gradient-checkpointing --no-shuffle --checkpoint-every 0 --lr 1e-4 --warmup-steps 0)
{
  "$bin" "${args[@]}" --device cuda:0 --output "$work/alone" 2>&1 | grep -E 'wrote|tokens/s' | tail -2
  port=$((20000 + RANDOM % 20000))
  for rank in 0 1; do
    # Both ranks on cuda:0: NCCL refuses two ranks on one GPU, so the host sums.
    ARENAFLOW_NCCL=0 WORLD_SIZE=2 RANK=$rank LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "$bin" "${args[@]}" --device cuda:0 --output "$work/together" > "$work/rank$rank.log" 2>&1 &
  done
  wait
  grep -hE 'rank|tokens/s' "$work"/rank0.log "$work"/rank1.log | tail -6
  python3 - "$work/alone/adapter_model.safetensors" "$work/together/adapter_model.safetensors" <<'PY'
import sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), "the adapters hold different tensors"
worst = max(float(abs(a[k].astype("f8") - b[k].astype("f8")).max() / max(abs(a[k]).max(), 1e-12)) for k in a)
print(f"two ranks on one GPU vs one process: {len(a)} tensors, largest difference {worst:.2e} (relative)")
PY
} 2>&1 | tee "$OUT/dp-check.txt"
