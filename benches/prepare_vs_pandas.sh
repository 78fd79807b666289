#!/usr/bin/env bash
# Side by side on one machine, one file: arenaflow (criterion) and pandas parsing,
# normalising and folding the real Kaggle rows replicated to 57,477 rows with fresh ids.
# Prints rows/s of both and the ratio. Run from anywhere: benches/prepare_vs_pandas.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=57477
VENV=.venv-bench
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet 'pandas==2.*' 'xxhash==3.*'
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
csv="$work/train_$ROWS.csv"
"$VENV/bin/python" benches/prepare_vs_pandas.py --make ../shared/data/lmsys-arena/train_sample.csv "$csv" "$ROWS"

ARENAFLOW_BENCH_CSV="$csv" cargo bench --workspace --bench prepare -- --noplot 2>&1 | grep -v '^\s*$' | tail -n 6
target_dir=$(cargo metadata --format-version 1 --no-deps | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
estimates="$target_dir/criterion/prepare/parse_normalise_fold_57477/new/estimates.json"
rust_s=$("$VENV/bin/python" -c "import json; print(json.load(open('$estimates'))['median']['point_estimate'] / 1e9)")

pandas_out=$("$VENV/bin/python" benches/prepare_vs_pandas.py "$csv" --repeat 5)
echo "$pandas_out" | head -n 1
pandas_s=$(echo "$pandas_out" | sed -n 's/^PANDAS_MEDIAN_S=//p')

"$VENV/bin/python" - "$rust_s" "$pandas_s" "$ROWS" <<'PY'
import sys
rust, pandas, rows = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print(f"arenaflow: median {rust:.3f} s, {rows / rust:,.0f} rows/s")
print(f"pandas:    median {pandas:.3f} s, {rows / pandas:,.0f} rows/s")
print(f"ratio (arenaflow rows/s / pandas rows/s): {pandas / rust:.2f}x")
PY
