#!/usr/bin/env bash
# Issue 16, point 4b's second half, on the CPU: GPTQ checkpoints arenaflow writes (the
# llama, qwen2 and gemma2 fixtures with their adapters merged; 8 bits, with and without
# act-order; one group per row, since gptqmodel's CPU kernels take group sizes of 16..1024
# and the fixtures are 48 and 72 wide; for the same reason no 4 bits: gptqmodel picks its
# fused int4 CPU kernel, which takes groups of 32..256 only) loaded by transformers + optimum + gptqmodel
# (TorchLinear), against arenaflow's logits of the same checkpoints on 40 random rows:
# benches/gptq_ecosystem_check.py says what is compared.
#
# A Python with torch (CPU), transformers, optimum and gptqmodel; gptqmodel has no wheel,
# its sdist builds without CUDA:
#   python -m venv V && V/bin/pip install torch transformers optimum pyarrow
#   BUILD_CUDA_EXT=0 V/bin/pip install gptqmodel
#
#   PY=V/bin/python benches/gptq_ecosystem_check.sh      # prints one block per checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:?the Python of the venv above}
B=${ARENAFLOW:-${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}/debug/arenaflow}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY - "$work/rows.parquet" <<'PY'
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(3)
rows = [rng.integers(3, 96, int(rng.integers(8, 24))).astype(np.int32).tolist() for _ in range(40)]
pq.write_table(pa.table({"id": [f"c{i}" for i in range(40)], "input_ids": pa.array(rows, pa.list_(pa.int32()))}), sys.argv[1])
PY
$PY -c 'import torch, transformers, optimum.version as o, gptqmodel; print(f"torch {torch.__version__}, transformers {transformers.__version__}, optimum {o.__version__}, gptqmodel {gptqmodel.__version__}")' 2>/dev/null
for family in llama qwen2 gemma2; do
  for variant in "8" "8 --act-order"; do
    read -r bits order <<<"$variant"
    q="$work/$family-$bits${order:+-act-order}"
    "$B" quantize --model tests/fixtures/models/$family/base --adapter tests/fixtures/models/$family/adapter \
      --input "$work/rows.parquet" --rows 32 --output "$q" --bits "$bits" --group-size -1 ${order:-} >/dev/null 2>&1
    for dtype in f32 f16; do
      "$B" logits --model "$q" --input "$work/rows.parquet" --output "$q-$dtype.parquet" --dtype $dtype \
        --device cpu >/dev/null 2>&1
    done
    echo "== $family, $bits bits${order:+, act-order}"
    CUDA_VISIBLE_DEVICES= $PY benches/gptq_ecosystem_check.py "$q" "$work/rows.parquet" "$q-f32.parquet" \
      "$q-f16.parquet" 2>&1 | grep -E '^(weights|logits|f16)|Error' || echo "gptq_ecosystem_check.py failed"
  done
done
