#!/usr/bin/env bash
# Side by side on one machine: the tokenize operator (criterion) and the same template and
# truncation in Python over Hugging Face `tokenizers` (batched, fast), on the 1,982 real
# Kaggle rows replicated to 19,820, blackpearl, max length 1,024, balanced truncation, with
# the Llama-3 and Gemma-2 tokenizers. Prints rows/s of both and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=19820
VENV=.venv-bench
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import tokenizers' 2>/dev/null || "$VENV/bin/pip" install --quiet 'tokenizers==0.23.*'

cargo bench --workspace --bench tokenize -- --noplot 2>&1 | grep -v '^\s*$' | tail -n 12
target_dir=$(cargo metadata --format-version 1 --no-deps | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
for family in llama3 gemma2; do
  estimates="$target_dir/criterion/tokenize/blackpearl_1024_${family}_${ROWS}/new/estimates.json"
  rust_s=$("$VENV/bin/python" -c "import json; print(json.load(open('$estimates'))['median']['point_estimate'] / 1e9)")
  python_json=$("$VENV/bin/python" benches/tokenize_reference.py bench --tokenizer "../shared/tokenizers/$family/tokenizer.json" \
    --template blackpearl --max-length 1024 --truncation balanced --rows "$ROWS" --repeats 5)
  "$VENV/bin/python" - "$family" "$rust_s" "$python_json" <<'PY'
import json, sys
family, rust, py = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
rows = py["rows"]
print(f"{family}: arenaflow median {rust:.3f} s ({rows / rust:,.0f} rows/s); "
      f"python tokenizers median {py['median_s']:.3f} s ({py['rows_per_s']:,.0f} rows/s, {py['tokens_per_s']:,.0f} tokens/s); "
      f"ratio {py['median_s'] / rust:.2f}x")
PY
done
