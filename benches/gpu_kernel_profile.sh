#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel (issue 15, point 2): Nsight Compute
# (ncu, on the GPU machine; --clock-control none leaves the clocks alone) times every kernel
# of a short `arenaflow train` run, and the kernels are summed by name (template arguments
# dropped) into $OUT/kernels-NAME.txt, largest first, with their share and launch count.
# ncu runs the kernels one at a time: the totals are GPU time without overlap, not wall time.
#
#   smol:    SmolLM2-135M on the parity rows (benches/train_parity.sh rows; the GGUF staged by
#            benches/gpu_recipe.sh stage), 16 rows x 512 tokens a step, dropout 0.05
#   llama8b: the race's shape and settings (benches/train_race.sh prepare; --lora-autocast as
#            the race, since 2026-12-04's sixth session: its first profile ran the adapters
#            in f32), random weights, r 64
#
#   benches/gpu_kernel_profile.sh smol|llama8b [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
steps=${2:-2}
arenaflow_bin
work=$(mktemp -d)
case "${1:-}" in
  smol)
    [ -f "$SMOLLM2" ] || smollm2
    cmd=("$bin" train --model "$SMOLLM2" --input device/parity/rows.parquet --output "$work/adapter"
      --dtype bf16 --device cuda:0 --lora-r 16 --lora-alpha 32 --batch-rows 16
      --no-shuffle --adam-beta2 0.95 --max-steps "$steps" --checkpoint-every 0
      --gradient-checkpointing)
    ;;
  llama8b)
    cmd=("$bin" train --model benches/configs/llama-3.1-8b.json --random-weights 0
      --input device/train_race/llama3_fixed.parquet --output "$work/adapter" --dtype bf16
      --device cuda:0 --lora-r 64 --lora-alpha 128 --lora-dropout 0 --lora-autocast --batch-rows 8
      --max-batch-tokens 8192 --max-steps "$steps" --gradient-checkpointing --no-shuffle
      --checkpoint-every 0 --lr 1e-4 --adam-beta2 0.95 --warmup-steps 0)
    ;;
  *)
    echo "usage: benches/gpu_kernel_profile.sh smol|llama8b [STEPS]" >&2
    exit 2
    ;;
esac
ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  --log-file "$work/ncu.csv" "${cmd[@]}" > "$work/run.txt" 2>&1 || { tail -20 "$work/run.txt"; exit 1; }
grep -v '^|' "$work/run.txt" | tail -3
python3 - "$work/ncu.csv" <<'PY' | tee "${OUT:-.}/kernels-$1.txt"
import csv, re, sys
from collections import defaultdict
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
total, count = defaultdict(float), defaultdict(int)
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = re.sub(r"<.*>", "", r["Kernel Name"]).split("(")[0].strip()
    total[name] += float(r["Metric Value"].replace(",", ""))
    count[name] += 1
grand = sum(total.values())
print(f"{sum(count.values())} kernels, {grand / 1e6:.1f} ms of GPU time (ncu, one at a time)")
for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[:40]:
    print(f"{ns / 1e6:10.2f} ms {100 * ns / grand:5.1f}% {count[name]:7d}  {name}")
PY
rm -rf "$work"
