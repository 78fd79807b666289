#!/usr/bin/env bash
# Issue 16, point 4c: held-out log loss of a trained SmolLM2 student, 8-bit GPTQ against
# bf16, on the GPU machine. The student is a fold-0 adapter of the ablation's runs (by
# default the information-gain student's, left in the stash by benches/gpu_ablation.sh);
# the rows are fold 0's (device/parity/rows.parquet from `benches/train_parity.sh rows`:
# the training side with its swapped copies calibrates, the 397 held-out rows score).
#
# GPU, after the ablation's calls (carry device/parity):
#   benches/gpu_int8_quality.sh [ADAPTER] [CALIBRATION_ROWS]   # $OUT/int8-quality.txt
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
adapter=${1:-$stash/runs/q_ig/train/student_kd_cal_ig/fold0/adapter}
rows=${2:-128}
arenaflow_bin
[ -f "$SMOLLM2" ] || smollm2
work=$stash/int8
rm -rf "$work"
mkdir -p "$work"
python3 - "$work" <<'PY'
import random
import sys
import pyarrow as pa
import pyarrow.parquet as pq
t = pq.read_table("device/parity/rows.parquet")
# Plain strings: some pyarrow versions cannot take rows of string_view columns.
t = t.cast(pa.schema([pa.field(f.name, pa.string() if pa.types.is_string_view(f.type) else f.type, f.nullable) for f in t.schema]))
split = t.column("split").to_pylist()
train = [i for i, s in enumerate(split) if s == "train"]
# Calibration rows in a seeded random order (the file lists ids in order).
random.Random(2026).shuffle(train)
pq.write_table(t.take(pa.array(train)), sys.argv[1] + "/train.parquet")
pq.write_table(t.take(pa.array([i for i, s in enumerate(split) if s == "dev"])), sys.argv[1] + "/dev.parquet")
PY
log=${OUT:-.}/int8-quality.txt
{
  echo "adapter $adapter, $rows calibration rows, $(date -u +%FT%TZ)"
  "$bin" logits --model "$SMOLLM2" --adapter "$adapter" --merge-adapter --dtype bf16 \
    --device cuda:0 --input "$work/dev.parquet" --output "$work/bf16.parquet"
  "$bin" quantize --model "$SMOLLM2" --adapter "$adapter" \
    --input "$work/train.parquet" --rows "$rows" --bits 8 --group-size 64 --dtype bf16 \
    --device cuda:0 --output "$work/gptq8"
  "$bin" logits --model "$work/gptq8" --dtype bf16 --device cuda:0 \
    --input "$work/dev.parquet" --output "$work/int8.parquet"
  python3 - "$work" <<'PY'
import sys
import numpy as np
import pyarrow.parquet as pq
work = sys.argv[1]
labels = dict(zip(*[pq.read_table(work + "/dev.parquet").column(c).to_pylist() for c in ("id", "label")]))
def log_loss(name):
    t = pq.read_table(f"{work}/{name}.parquet").to_pydict()
    logits = np.array(t["logits"], dtype=np.float64)
    y = np.array([labels[i] for i in t["id"]])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = -np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1))
    return rows, logits
a, la = log_loss("bf16")
b, lb = log_loss("int8")
d = b - a
print(f"held-out rows {len(a)}: log loss bf16 {a.mean():.4f}, int8 {b.mean():.4f}, "
      f"int8 - bf16 {d.mean():+.4f} (SE {d.std(ddof=1) / np.sqrt(len(d)):.4f}); "
      f"largest logit gap {np.abs(la - lb).max():.4f}")
PY
} 2>&1 | tee "$log"
