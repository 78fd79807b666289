"""Issue 16, point 4b's second half: a GPTQ checkpoint arenaflow wrote, loaded by the
ecosystem's loader (transformers + optimum + gptqmodel's TorchLinear, on the CPU), against
arenaflow's own logits on the same rows (benches/gptq_ecosystem_check.sh runs it all).

1. Weights: every quantized projection that gptqmodel dequantizes (`dequantize_weight()`,
   in its module dtype) against the format's formula in plain Python
   (tests/fixtures/gptq/dequantize_checkpoint.py) rounded to that dtype: how many differ.
2. Logits, f32: transformers' float model carrying the formula's weights against
   arenaflow's f32 logits of the checkpoint.
3. Logits, the loader as it runs: transformers + gptqmodel (its kernels dequantize to f16)
   against (2)'s float model with the formula's weights rounded to f16, and against
   arenaflow's f32 logits; and, for scale, each side's f16 run against its f32 one.
Each row runs alone (no padding).

    python benches/gptq_ecosystem_check.py CHECKPOINT ROWS.parquet AF_F32.parquet AF_F16.parquet
"""

import importlib.util
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "dequantize_checkpoint", os.path.join(HERE, "..", "tests", "fixtures", "gptq", "dequantize_checkpoint.py"))
formula = importlib.util.module_from_spec(spec)
spec.loader.exec_module(formula)


def formula_weights(folder):
    """{prefix: W (out, in) f32} by the format's formula."""
    out = os.path.join("/tmp", f"gptq-formula-{os.getpid()}.safetensors")
    argv = sys.argv
    sys.argv = ["dequantize_checkpoint.py", folder, out]
    try:
        formula.main()
    finally:
        sys.argv = argv
    weights = {k[: -len(".weight")]: v for k, v in load_file(out).items()}
    os.remove(out)
    return weights


def logits_of(model, rows, dtype):
    with torch.no_grad():
        return {i: model(input_ids=torch.tensor([ids])).logits[0].to(torch.float64).numpy()
                for i, ids in rows}


def largest(a, b):
    return max(float(np.abs(a[i] - b[i]).max()) for i in a)


def main():
    folder, rows_path, af32_path, af16_path = sys.argv[1:5]
    table = pq.read_table(rows_path).to_pydict()
    rows = list(zip(table["id"], table["input_ids"]))
    arenaflow = {}
    for name, path in [("f32", af32_path), ("f16", af16_path)]:
        t = pq.read_table(path).to_pydict()
        arenaflow[name] = {i: np.array(z, np.float64) for i, z in zip(t["id"], t["logits"])}

    weights = formula_weights(folder)

    # 1. gptqmodel's dequantized weights against the formula's.
    loaded = AutoModelForSequenceClassification.from_pretrained(folder, device_map="cpu").eval()
    checked = differing = 0
    kernel = kernel_dtype = None
    for name, module in loaded.named_modules():
        if hasattr(module, "dequantize_weight") and hasattr(module, "qweight"):
            kernel, kernel_dtype = type(module).__name__, module.scales.dtype
            ours = weights[name.removeprefix("base_model.")]
            dequantized = module.dequantize_weight()
            kernel_dtype = dequantized.dtype
            theirs = dequantized.T.to(torch.float32)  # (in, out) -> (out, in)
            want = ours.to(kernel_dtype).to(torch.float32)
            checked += want.numel()
            differing += int((theirs != want).sum())
    print(f"weights: {checked} dequantized by gptqmodel's {kernel}, {differing} differ from the "
          f"format's formula rounded to its {kernel_dtype}")

    # 2. The float model with the formula's weights, f32, against arenaflow's f32 logits.
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()
             if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    state.update({f"{k}.weight": v for k, v in weights.items()})
    float_model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing, unexpected = float_model.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("rotary_emb.inv_freq") for m in missing), (missing, unexpected)
    float_model.eval()
    f32 = logits_of(float_model, rows, torch.float32)
    scale = max(float(np.abs(z).max()) for z in f32.values())
    print(f"logits f32: transformers with the formula's weights vs arenaflow's logits of the checkpoint: "
          f"largest difference {largest(f32, arenaflow['f32']):.3e} over {len(rows)} rows "
          f"(largest logit {scale:.3f})")

    # 3. The loader as it runs against the float model whose weights are the formula's rounded
    # to the loader's dtype (the rest as loaded), and against (2); each model's f16 run
    # against f32, arenaflow's and transformers', for scale.
    ecosystem = logits_of(loaded, rows, None)
    for k, v in weights.items():
        state[f"{k}.weight"] = v.to(kernel_dtype).to(torch.float32)
    float_model.load_state_dict(state, strict=False)
    rounded = logits_of(float_model, rows, torch.float32)
    f16 = logits_of(float_model.to(torch.float16), rows, torch.float16)
    print(f"logits, the loader as it runs (model dtype {loaded.dtype}, {kernel_dtype} weights): "
          f"{largest(ecosystem, rounded):.3e} off the float model with the formula's weights in "
          f"{kernel_dtype}, {largest(ecosystem, arenaflow['f32']):.3e} off arenaflow's f32 logits")
    print(f"f16 for scale: arenaflow f16 vs its f32 {largest(arenaflow['f16'], arenaflow['f32']):.3e}; "
          f"transformers f16 vs f32 {largest(f16, f32):.3e}")

if __name__ == "__main__":
    main()
