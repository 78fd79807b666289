"""Markdown tables of the teacher-forward race from the JSON lines that
benches/teacher_race.sh wrote on the GPU machine (arenaflow.jsonl, torch-*.jsonl,
arenaflow-detail.jsonl): tokens/s, rows/s, model FLOP utilisation against 790 TFLOP/s and
peak memory per side, the ratios of arenaflow to each PyTorch variant, and the per-section
profile.

    python benches/teacher_race_report.py RESULTS_DIR
"""

import glob
import json
import os
import sys

PEAK = 790e12
# Parameters outside the embedding, and the attention shape, of the real configs.
MODELS = {
    "llama": dict(layers=32, hidden=4096, heads=32, kv=8, head_dim=128, inter=14336, mlp_mats=3),
    "gemma": dict(layers=42, hidden=3584, heads=16, kv=8, head_dim=256, inter=14336, mlp_mats=3),
}


def flops_per_token(m, mean_causal_len):
    attn_proj = m["hidden"] * m["head_dim"] * (2 * m["heads"] + 2 * m["kv"])
    mlp = m["mlp_mats"] * m["hidden"] * m["inter"]
    dense = 2 * m["layers"] * (attn_proj + mlp)
    # Q K^T and P V over the keys a query sees (causal: on average half the row).
    attn = 2 * 2 * m["layers"] * m["heads"] * m["head_dim"] * mean_causal_len
    return dense + attn


def load(results):
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "*.jsonl"))):
        for line in open(path):
            if line.strip():
                rows.append(json.loads(line))
    return rows


def main():
    results = sys.argv[1]
    rows = load(results)
    lengths = {}
    for case in ["fixed_1024", "sample_1024", "sample_2000"]:
        for fam, model in [("llama3", "llama"), ("gemma2", "gemma")]:
            npz = os.path.join("device/race", f"{fam}_{case}.npz")
            if os.path.exists(npz):
                import numpy as np
                l = np.load(npz)["lengths"].astype(np.float64)
                lengths[(model, case)] = float((l * (l + 1) / 2).sum() / l.sum())
    print("| model | case | side | tokens/s | rows/s | MFU (790 TFLOP/s) | peak memory GiB | arenaflow / this |")
    print("|---|---|---|---|---|---|---|---|")
    main_rows = [r for r in rows if r["side"] in ("arenaflow",) or r["side"].startswith("torch")]
    for model in ["llama", "gemma"]:
        for case in ["fixed_1024", "sample_1024", "sample_2000"]:
            ours = [r for r in main_rows if r["model"] == model and r["case"] == case and r["side"] == "arenaflow"]
            ours_tps = ours[0]["stats"]["tokens_per_second"] if ours else None
            for r in sorted((r for r in main_rows if r["model"] == model and r["case"] == case),
                            key=lambda r: r["side"]):
                s = r["stats"]
                tps = s["tokens_per_second"]
                fl = flops_per_token(MODELS[model], lengths.get((model, case), 0.0))
                mem = s.get("peak_memory_bytes") or s.get("peak_reserved_bytes") or 0
                ratio = "" if r["side"] == "arenaflow" or not ours_tps else f"{ours_tps / tps:.2f}x"
                print(f"| {model} | {case} | {r['side']} | {tps:,.0f} | {s['rows_per_second']:.1f} | "
                      f"{100 * tps * fl / PEAK:.1f}% | {mem / 2**30:.1f} | {ratio} |")
    detail = [r for r in rows if r["side"].startswith("arenaflow ")]
    if detail:
        print()
        print("| model | variant | tokens/s | profile (seconds by section) |")
        print("|---|---|---|---|")
        for r in detail:
            s = r["stats"]
            prof = ", ".join(f"{k} {v:.3f}" for k, v in sorted(s.get("profile", {}).items(), key=lambda kv: -kv[1]))
            print(f"| {r['model']} | {r['side'][10:]} | {s['tokens_per_second']:,.0f} | {prof} |")


if __name__ == "__main__":
    main()
