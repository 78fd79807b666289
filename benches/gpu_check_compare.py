"""Compares the GPU logits of benches/gpu_check.sh (a tar of Parquet files) with
transformers' reference logits of the fixtures (f32, and its own bf16 error) and with the
CPU path of this machine (f32), and prints a table.

    python benches/gpu_check_compare.py gpu_check.tar [--cpu BIN]
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logits_of(data):
    t = pq.read_table(io.BytesIO(data)).to_pydict()
    return dict(zip(t["id"], [np.array(v, dtype=np.float64) for v in t["logits"]]))


def diff(got, want):
    return max(float(np.abs(got[f"r{i}"] - np.array(w)).max()) for i, w in enumerate(want))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("tar")
    p.add_argument("--cpu", help="arenaflow binary for the CPU f32 comparison")
    args = p.parse_args()
    files = {}
    with tarfile.open(args.tar) as tar:
        for m in tar.getmembers():
            if m.isfile():
                files[os.path.basename(m.name)[:-len(".parquet")]] = logits_of(tar.extractfile(m).read())
    print("| family | weights | padding | dtype | kernels | max abs diff vs transformers f32 | transformers bf16 error | vs CPU f32 |")
    print("|---|---|---|---|---|---|---|---|")
    worst = {}
    for fam in ["llama", "qwen2", "gemma2"]:
        ref = json.load(open(os.path.join(ROOT, f"tests/fixtures/models/{fam}/reference.json")))
        tbf16 = diff({f"r{i}": np.array(v) for i, v in enumerate(ref["base_bf16"]["right"])}, ref["base"]["right"])
        for weights in ["base", "adapter"]:
            for padding in ["right", "left"]:
                cpu = None
                if args.cpu:
                    with tempfile.TemporaryDirectory() as d:
                        out = os.path.join(d, "cpu.parquet")
                        cmd = [args.cpu, "logits", "--model", f"tests/fixtures/models/{fam}/base", "--dtype", "f32",
                               "--padding", padding, "--max-batch-tokens", "64",
                               "--input", f"device/fixtures/{fam}.parquet", "--output", out]
                        if weights == "adapter":
                            cmd += ["--adapter", f"tests/fixtures/models/{fam}/adapter"]
                        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                        cpu = logits_of(open(out, "rb").read())
                for dtype in ["f32", "bf16"]:
                    for kernels in ["on", "off"]:
                        got = files[f"{fam}_{dtype}_{kernels}_{weights}_{padding}"]
                        d = diff(got, ref[weights][padding])
                        c = max(float(np.abs(got[k] - cpu[k]).max()) for k in cpu) if cpu else float("nan")
                        worst[(fam, dtype, kernels)] = max(worst.get((fam, dtype, kernels), 0.0), d)
                        print(f"| {fam} | {weights} | {padding} | {dtype} | {kernels} | {d:.3e} | "
                              f"{tbf16 if dtype == 'bf16' else float('nan'):.3e} | {c:.3e} |")
    print()
    for (fam, dtype, kernels), d in sorted(worst.items()):
        print(f"worst {fam} {dtype} kernels={kernels}: {d:.3e}")


if __name__ == "__main__":
    sys.exit(main())
