#!/usr/bin/env bash
# Two builds of arenaflow side by side on the CPU of one machine (a change against the
# commit before it), alternating, each measurement ROUNDS times (default 5; medians):
#   forward: `arenaflow logits --device cpu --dtype f32` over FORWARD_ROWS (default 256)
#     rows x 256 random tokens
#     with random weights, at the size of benches/benches/forward.rs (hidden 512, 4 layers,
#     8 heads, 2 KV heads, vocab 32,000; Gemma-2 with its soft-cap and a 128-token window),
#     per family: the figures' tokens/s (loading excluded);
#   tokenize: `arenaflow run plans/prepare.sql plans/tokenize.sql` on the real sample
#     (1,982 rows, both orders, Gemma-2 tokenizer, max length 1,024): wall seconds.
#
#   benches/versions_cpu.sh BEFORE_BIN AFTER_BIN DATA_DIR OUT_DIR
# DATA_DIR holds train_sample.csv and gemma2/tokenizer.json (+ tokenizer_config.json).
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1 after=$2 data=$3 out=$4
work=$(mktemp -d)
python3 - "$work" "${FORWARD_ROWS:-256}" <<'PY'
import json, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
work, n_rows = sys.argv[1], int(sys.argv[2])
base = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "pad_token_id": 0,
        "id2label": {"0": "a", "1": "b", "2": "tie"}}
for family, arch in [("llama", "Llama"), ("qwen2", "Qwen2"), ("gemma2", "Gemma2")]:
    c = dict(base, model_type=family, architectures=[f"{arch}ForSequenceClassification"])
    if family == "gemma2":
        c.update(head_dim=64, query_pre_attn_scalar=64, attn_logit_softcapping=50.0, sliding_window=128)
    json.dump(c, open(f"{work}/{family}.json", "w"))
rng = np.random.default_rng(1)
rows = [rng.integers(1, 32000, 256).astype(np.int32).tolist() for _ in range(n_rows)]
pq.write_table(pa.table({"id": [f"r{i}" for i in range(n_rows)],
                         "input_ids": pa.array(rows, pa.list_(pa.int32()))}), f"{work}/rows.parquet")
PY
for round in $(seq "${ROUNDS:-5}"); do
  for side in before after; do
    bin=${!side}
    for family in llama qwen2 gemma2; do
      line=$("$bin" logits --model "$work/$family.json" --random-weights 0 --dtype f32 --device cpu \
        --input "$work/rows.parquet" --output "$work/out.parquet" | grep '^stats ' | sed 's/^stats //')
      echo "{\"side\": \"$side\", \"bench\": \"forward_$family\", \"round\": $round, \"stats\": $line}" >>"$out/versions-cpu.jsonl"
    done
    run="$work/run-$side-$round"
    start=$EPOCHREALTIME
    "$bin" run plans/prepare.sql plans/tokenize.sql --run-dir "$run" --set train="$data/train_sample.csv" \
      --set tokenizer="$data/gemma2/tokenizer.json" >/dev/null
    end=$EPOCHREALTIME
    echo "{\"side\": \"$side\", \"bench\": \"prepare_tokenize\", \"round\": $round, \"seconds\": $(awk "BEGIN {print $end - $start}")}" >>"$out/versions-cpu.jsonl"
  done
done
python3 - "$out/versions-cpu.jsonl" <<'PY' | tee "$out/versions-cpu.txt"
import json, statistics, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    value = r["stats"]["tokens_per_second"] if "stats" in r else r["seconds"]
    runs[(r["bench"], r["side"])].append(value)
for bench in sorted({b for b, _ in runs}):
    b, a = statistics.median(runs[(bench, "before")]), statistics.median(runs[(bench, "after")])
    unit = "s" if bench == "prepare_tokenize" else "tokens/s"
    better = b / a if unit == "s" else a / b
    print(f"{bench}: before {b:,.2f} {unit}, after {a:,.2f} {unit} (medians of {len(runs[(bench, 'after')])}); after/before speed {better:.3f}x")
PY
