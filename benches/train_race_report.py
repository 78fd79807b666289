"""The training race's table (benches/train_race.sh): from a folder holding
`train-arenaflow-MODEL-CASE.txt` (arenaflow train's output) and `train-torch.jsonl`
(benches/train_race.py's lines, labelled MODEL_CASE), one Markdown row per side and pair:
steps timed, median step, tokens/s (the timed steps' unpadded tokens over their seconds),
arenaflow over torch, peak memory, and utilisation against 790 TFLOP/s (the H200's
measured bf16 peak, ../shared/GPU.md) counting 6 x parameters FLOPs a token (forward,
recompute, input gradient of the frozen projections; the parameters are the decoder's
projections, embeddings being a lookup; attention's own FLOPs not counted).

    python3 benches/train_race_report.py benches/results/h200-training/race-DATE
"""

import glob
import json
import os
import re
import statistics
import sys

PEAK = 790e12
CONFIGS = {"llama": "benches/configs/llama-3.1-8b.json", "gemma": "benches/configs/gemma-2-9b.json"}


def projection_parameters(path):
    c = json.load(open(path))
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)


def arenaflow_side(path):
    """Steps 2..N of the step table: (step seconds, step tokens), and the peak memory."""
    header, steps, peak = None, [], None
    for line in open(path):
        m = re.search(r"peak memory ([0-9.]+) GiB( \(([0-9.]+) GiB allocated\))?", line)
        if m:
            peak = (float(m.group(1)), m.group(3) and float(m.group(3)))
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "kind":
            header = cells
        elif header and cells[0] == "step":
            row = dict(zip(header, cells))
            tokens = int(row["tokens"])
            steps.append((int(row["step"]), tokens / float(row["tokens_per_s"]), tokens))
    timed = [(s, t) for k, s, t in steps if k >= 2]
    if not timed:
        raise SystemExit(f"{path}: no step table with steps after the first")
    return timed, peak


def row(model, case, side, timed, memory, params, against=None):
    seconds = sum(s for s, _ in timed)
    tokens = sum(t for _, t in timed)
    rate = tokens / seconds
    util = 6 * params * rate / PEAK
    ratio = f"{rate / against:.2f}x" if against else "1"
    return rate, (f"| {model} | {case} | {side} | {len(timed)} | {statistics.median(s for s, _ in timed):.3f} s "
                  f"| **{rate:,.0f}** | {ratio} | {memory} | {100 * util:.1f}% |")


def main():
    folder = sys.argv[1]
    torch_lines = {}
    torch_path = os.path.join(folder, "train-torch.jsonl")
    if os.path.exists(torch_path):
        for line in open(torch_path):
            if line.strip():
                j = json.loads(line)
                torch_lines[j["label"]] = j
    print("| model | case | side | steps timed | median step | tokens/s | against torch | peak memory | utilisation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(folder, "train-arenaflow-*-*.txt"))):
        model, case = re.match(r"train-arenaflow-(\w+)-(\w+)\.txt", os.path.basename(path)).groups()
        params = projection_parameters(CONFIGS[model])
        torch_rate = None
        t = torch_lines.get(f"{model}_{case}")
        if t:
            tokens = t.get("step_tokens") or [t["tokens_per_step"]] * len(t["steps"])
            torch_rate, line = row(model, case, f"torch + PEFT ({t['attn']})", list(zip(t["steps"], tokens)),
                                   f"{t['peak_memory_gib']:.2f} GiB allocated, {t['device_in_use_gib']:.2f} GiB "
                                   "device in use", params)
            print(line)
        timed, peak = arenaflow_side(path)
        memory = "-"
        if peak:
            memory = (f"{peak[1]:.2f} GiB allocated, " if peak[1] else "") + f"{peak[0]:.2f} GiB device in use"
        print(row(model, case, "arenaflow", timed, memory, params, torch_rate)[1])


if __name__ == "__main__":
    main()
