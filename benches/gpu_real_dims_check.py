"""Correctness on the GPU at the race's real dimensions (run on the GPU machine after
unpacking the CUDA build to device/bin/arenaflow, as benches/teacher_race.sh does): transformers builds a 2-layer model with the
real widths of Llama-3.1-8B or gemma-2-9b (head size 128 / 256, GQA, soft-cap 50; Gemma's
sliding window cut to 256 so that it acts on these rows), seeded bf16 weights, and saves it;
arenaflow loads the saved folder and computes logits for 16 real rows (up to 2,000 tokens)
with its kernels and with candle's composed ops, in bf16, f16 (issue 16's point 6: V100s
and T4s have no bf16) and f32; PyTorch computes them in f32 (the reference) and in bf16
and f16 (its own errors). Prints one JSON line per family.

    python3 benches/gpu_real_dims_check.py
"""

import copy
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

ROWS = 16


def main():
    os.makedirs("device/scratch", exist_ok=True)
    for fam, cfg_path, data in [
        ("llama", "benches/configs/llama-3.1-8b.json", "device/race/llama3_sample_2000.npz"),
        ("gemma", "benches/configs/gemma-2-9b.json", "device/race/gemma2_sample_2000.npz"),
    ]:
        config = AutoConfig.from_pretrained(cfg_path)
        config.num_hidden_layers = 2
        if fam == "gemma":
            config.sliding_window = 256
            config.layer_types = ["sliding_attention", "full_attention"]
        config._attn_implementation = "eager"
        torch.manual_seed(7)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(1.0 if fam == "llama" else 0.0, 0.1)
                else:
                    p.normal_(0.0, 0.02)
        folder = f"device/scratch/real-{fam}"
        model.save_pretrained(folder, safe_serialization=True)
        npz = np.load(data)
        lengths = npz["lengths"][:4000]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # 16 rows spread over the lengths, the longest included.
        order = np.argsort(-lengths, kind="stable")
        pick = [int(order[i * (len(order) // ROWS)]) for i in range(ROWS)]
        rows = [npz["tokens"][offsets[i]:offsets[i + 1]].astype(np.int64) for i in pick]
        inp = f"device/scratch/real-{fam}-rows.parquet"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(ROWS)],
                                 "input_ids": pa.array([r.astype(np.int32).tolist() for r in rows], pa.list_(pa.int32()))}), inp)

        def torch_logits(m, dtype):
            out = []
            with torch.inference_mode():
                for r in rows:
                    ids = torch.from_numpy(r)[None].cuda()
                    out.append(m(input_ids=ids).logits.float().cpu().numpy()[0])
            return np.array(out)

        bf16 = torch_logits(model, torch.bfloat16)
        # A copy: rounding the bf16 weights to f16 in place would change the f32 reference.
        f16 = torch_logits(copy.deepcopy(model).half(), torch.float16)
        ref = torch_logits(model.float(), torch.float32)
        result = {"family": fam, "rows": ROWS, "longest": int(max(len(r) for r in rows)),
                  "torch_bf16_error": float(np.abs(bf16 - ref).max()),
                  "torch_f16_error": float(np.nan_to_num(np.abs(f16 - ref), nan=np.inf).max()),
                  "max_abs_logit": float(np.abs(ref).max())}
        for label, env, dtype in [("arenaflow_kernels_bf16", "on", "bf16"), ("arenaflow_composed_bf16", "off", "bf16"),
                                  ("arenaflow_kernels_f16", "on", "f16"), ("arenaflow_composed_f16", "off", "f16"),
                                  ("arenaflow_kernels_f32", "on", "f32")]:
            out = f"device/scratch/real-{fam}-{label}.parquet"
            subprocess.run(["device/bin/arenaflow", "logits", "--model", folder, "--dtype", dtype, "--device", "cuda:0",
                            "--input", inp, "--output", out, "--max-batch-tokens", "4096"],
                           check=True, stdout=subprocess.DEVNULL, env={**os.environ, "ARENAFLOW_GPU_KERNELS": env})
            t = pq.read_table(out).to_pydict()
            got = np.array([t["logits"][t["id"].index(f"r{i}")] for i in range(ROWS)])
            result[label] = float(np.abs(got - ref).max())
        print(json.dumps(result), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
