#!/usr/bin/env bash
# Training parity on real rows (issue 15, point 4): arenaflow's `train` and a plain torch +
# PEFT loop (benches/train_parity.py), side by side in one call on the GPU machine, over the
# same rows of fold 0 (benches/parity_rows.sql: the real sample's training side with its
# swapped copies, 512 tokens), from the same initial adapter (arenaflow's fresh LoRA and
# head, written by a step at lr 0), in the same order, with dropout off: each step's loss
# and the dev log loss every 50 steps, then the two curves' largest gaps.
#
# Here:  benches/train_parity.sh rows          # device/parity/: the rows (CPU, a minute)
#        scripts/fetch-smollm2.sh; scripts/build-cuda.sh; benches/gpu_recipe.sh pack
# GPU:   calls 1-3 `benches/gpu_recipe.sh stage` (carry device/gpu/partN, and device/parity
#        with the third), then: benches/train_parity.sh run [STEPS]   # $OUT/parity-*.{txt,jsonl}
#        AUTOCAST=1 compares the mixed-precision loops instead: arenaflow --lora-autocast against
#        torch.autocast(bf16) (the LoRA matmuls in bf16); its files are $OUT/parity-autocast-*.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
case "${1:-}" in
  rows)
    bin=${ARENAFLOW:-${CARGO_TARGET_DIR:-$HOME/.cache/arenaflow/target}/debug/arenaflow}
    run=$(mktemp -d)
    "$bin" run plans/prepare.sql plans/folds.sql benches/parity_rows.sql --run-dir "$run" \
      --set pandalm= --set hh_rlhf= --set tokenizer="$SMOLLM2"
    mkdir -p device/parity
    cp "$run/parity/fold0_512.parquet" device/parity/rows.parquet
    rm -rf "$run"
    ls -l device/parity
    ;;
  run)
    steps=${2:-200}
    name=parity; ours=(); theirs=()
    if [ "${AUTOCAST:-0}" = 1 ]; then name=parity-autocast; ours=(--lora-autocast); theirs=(--autocast); fi
    unpack "$stash/arenaflow.xz" "$stash/bin/arenaflow"
    smollm2
    work=$stash/parity
    rm -rf "$work"
    mkdir -p "$work"
    af=("$stash/bin/arenaflow" train --model "$SMOLLM2" --input device/parity/rows.parquet
      --dtype bf16 --device cuda:0 --lora-r 16 --lora-alpha 32 --lora-dropout 0
      --batch-rows 16 --no-shuffle --adam-beta2 0.95 --max-grad-norm 1 --checkpoint-every 0)
    # The initial adapter: one step at lr 0 leaves arenaflow's fresh LoRA and head as drawn.
    "${af[@]}" --output "$work/init" --lr 0 --max-steps 1 >/dev/null 2>&1
    "$stash/bin/arenaflow" merge --model "$SMOLLM2" --adapter "$work/init" --output "$work/base" \
      --dtype bf16 >/dev/null
    "${af[@]}" --output "$work/arenaflow" --init-adapter "$work/init" --lr 2e-4 "${ours[@]}" \
      --warmup-ratio 0.1 --max-steps "$steps" --eval-every 50 2>&1 | tee "$OUT/$name-arenaflow.txt" \
      | grep -v '^|' | tail -3
    python3 benches/train_parity.py --base "$work/base" --adapter "$work/init" \
      --rows device/parity/rows.parquet --steps "$steps" --eval-every 50 "${theirs[@]}" > "$OUT/$name-torch.jsonl"
    python3 - "$work/arenaflow/metrics.parquet" "$OUT/$name-torch.jsonl" <<'PY' | tee "$OUT/$name.txt"
import json, sys
import pyarrow.parquet as pq
ours = pq.read_table(sys.argv[1]).to_pylist()
theirs = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
a = {r["step"]: r for r in ours if r["kind"] == "step"}
b = {r["step"]: r for r in theirs if r.get("kind") == "step"}
ea = {r["step"]: r for r in ours if r["kind"] == "eval"}
eb = {r["step"]: r for r in theirs if r.get("kind") == "eval"}
steps = sorted(set(a) & set(b))
gaps = [abs(a[s]["loss"] - b[s]["loss"]) for s in steps]
print(f"steps compared: {len(steps)}; loss gap: median {sorted(gaps)[len(gaps) // 2]:.4f}, max {max(gaps):.4f}")
for lo in range(0, len(steps), 50):
    part = steps[lo:lo + 50]
    ma = sum(a[s]["loss"] for s in part) / len(part)
    mb = sum(b[s]["loss"] for s in part) / len(part)
    print(f"steps {part[0]}-{part[-1]}: mean loss arenaflow {ma:.4f}, torch {mb:.4f}, gap {ma - mb:+.4f}")
for s in sorted(set(ea) & set(eb)):
    print(f"dev step {s}: arenaflow {ea[s]['dev_log_loss']:.4f}, torch {eb[s]['dev_log_loss']:.4f}, "
          f"gap {ea[s]['dev_log_loss'] - eb[s]['dev_log_loss']:+.4f}")
PY
    ;;
  *)
    echo "usage: benches/train_parity.sh rows | run [STEPS]" >&2
    exit 2
    ;;
esac
