"""pandas doing what benches/benches/prepare.rs does: read the Kaggle CSV, decode the
JSON turn lists, check and convert the one-hot labels, and assign seeded stratified
folds (xxh3-64 of the id with the seed, rank within the label, mod k).

Usage: python prepare_vs_pandas.py CSV [--repeat N]  (prints the median seconds and rows/s)
       python prepare_vs_pandas.py --make SAMPLE OUT ROWS  (replicates SAMPLE with fresh ids)
"""
import json
import statistics
import sys
import time

import numpy as np
import pandas as pd
import xxhash

TEXT = ["prompt", "response_a", "response_b"]
WINNERS = ["winner_model_a", "winner_model_b", "winner_tie"]


def prepare(path, k=5, seed=2025):
    df = pd.read_csv(path, dtype={"id": str, "model_a": str, "model_b": str})
    for column in TEXT:
        df[column] = [json.loads(v) for v in df[column]]
    onehot = df[WINNERS].to_numpy()
    if not (((onehot == 0) | (onehot == 1)).all() and (onehot.sum(axis=1) == 1).all()):
        raise ValueError("winner columns are not one-hot")
    df["label"] = onehot.argmax(axis=1).astype(np.int8)
    df = df.drop(columns=WINNERS)
    df["source"] = "kaggle"
    df["fold_key"] = np.array([xxhash.xxh3_64_intdigest(i.encode(), seed=seed) for i in df["id"]], dtype=np.uint64)
    df = df.sort_values(["label", "fold_key", "id"])
    df["fold"] = (df.groupby("label").cumcount() % k).astype(np.int32)
    return df.drop(columns=["fold_key"])


def make(sample, out, rows):
    df = pd.read_csv(sample, dtype=str, keep_default_na=False)
    copies = -(-rows // len(df))
    parts = []
    for copy in range(copies):
        part = df.copy()
        part["id"] = [str(copy * 10_000_000_000 + int(i)) for i in part["id"]]
        parts.append(part)
    pd.concat(parts).head(rows).to_csv(out, index=False)


def main():
    if sys.argv[1] == "--make":
        make(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    path = sys.argv[1]
    repeat = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--repeat" else 5
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        df = prepare(path)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"pandas {pd.__version__}: {len(df)} rows, median {median:.3f} s of {repeat}, {len(df) / median:,.0f} rows/s")
    print(f"PANDAS_MEDIAN_S={median}")


if __name__ == "__main__":
    main()
