"""Inputs of the teacher-forward race: from tokens.parquet files that `plans/tokenize.sql`
wrote (the real Kaggle sample through the Llama-3 or Gemma-2 tokenizer), the `ab` rows
replicated to N rows, written twice: Parquet for arenaflow (`id`, `input_ids`) and npz
for the PyTorch side (`lengths`, flat `tokens`). Also the fixed case: R rows of exactly
L random tokens. With `--labels`, the Parquet also gets a `label` column (0-2, drawn with
seed 0) for `arenaflow train` (the training race, benches/train_race.sh).

    python benches/teacher_race_inputs.py sample TOKENS.parquet OUT_STEM --rows 4000
    python benches/teacher_race_inputs.py fixed OUT_STEM --vocab 128256 --rows 80 --length 1024
"""

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write(stem, ids, rows, labels=False):
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    flat = np.concatenate(rows).astype(np.int32)
    np.savez_compressed(stem + ".npz", lengths=lengths, tokens=flat)
    columns = {"id": pa.array(ids, pa.string()),
               "input_ids": pa.array([r.tolist() for r in rows], pa.list_(pa.int32()))}
    if labels:
        columns["label"] = pa.array(np.random.default_rng(0).integers(0, 3, len(rows)).astype(np.int32))
    table = pa.table(columns)
    pq.write_table(table, stem + ".parquet", compression="zstd", compression_level=9)
    print(f"{stem}: {len(rows)} rows, {int(lengths.sum())} tokens, longest {int(lengths.max())}, "
          f"mean {lengths.mean():.1f}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sample")
    s.add_argument("tokens")
    s.add_argument("stem")
    s.add_argument("--rows", type=int, default=4000)
    f = sub.add_parser("fixed")
    f.add_argument("stem")
    f.add_argument("--vocab", type=int, required=True)
    f.add_argument("--rows", type=int, default=80)
    f.add_argument("--length", type=int, default=1024)
    for sp in (s, f):
        sp.add_argument("--labels", action="store_true", help="add a random `label` column")
    args = p.parse_args()
    if args.what == "sample":
        t = pq.read_table(args.tokens).to_pydict()
        base = [(i, np.array(x, dtype=np.int32)) for i, o, x in zip(t["id"], t["order"], t["input_ids"]) if o == "ab"]
        ids, rows = [], []
        for n in range(args.rows):
            i, r = base[n % len(base)]
            ids.append(f"{i}#{n // len(base)}")
            rows.append(r)
        write(args.stem, ids, rows, args.labels)
    else:
        rng = np.random.default_rng(0)
        # Ids 0..vocab-1 except 0..2 (pad/eos/bos of either family), so no pad id inside a row.
        rows = [rng.integers(3, args.vocab - 1, size=args.length, dtype=np.int32) for _ in range(args.rows)]
        write(args.stem, [f"fixed-{n}" for n in range(args.rows)], rows, args.labels)


if __name__ == "__main__":
    main()
