#!/usr/bin/env bash
# On the GPU machine: the model fixtures (tests/fixtures/models) through the CUDA build in
# f32 and bf16, base and adapter, right and left padding, with arenaflow's kernels and with
# candle's composed ops (ARENAFLOW_GPU_KERNELS=off); the logits go to $OUT/gpu_check.tar,
# which benches/gpu_check_compare.py compares with transformers' reference logits and the
# CPU path here. Needs device/arenaflow.xz and device/fixtures/*.parquet (see
# benches/teacher_race.sh --prepare).
set -euo pipefail
BIN=${BIN:-device/bin/arenaflow}
work=$(mktemp -d)
for fam in llama qwen2 gemma2; do
  for dtype in f32 bf16; do
    for kernels in on off; do
      for adapter in base adapter; do
        for padding in right left; do
          extra=()
          [ "$adapter" = adapter ] && extra=(--adapter tests/fixtures/models/$fam/adapter)
          ARENAFLOW_GPU_KERNELS=$kernels "$BIN" logits --model tests/fixtures/models/$fam/base "${extra[@]}" \
            --dtype $dtype --device cuda:0 --padding $padding --max-batch-tokens 64 \
            --input device/fixtures/$fam.parquet \
            --output "$work/${fam}_${dtype}_${kernels}_${adapter}_${padding}.parquet" >/dev/null
        done
      done
    done
  done
done
tar -C "$work" -cf "$OUT/gpu_check.tar" .
echo "gpu_check: $(ls "$work" | wc -l) logits files"
