"""Issue 16 point 5 on the GPU machine: the Gemma-2-9B shape's forward in bf16 against
GPTQ int8 (8 bits, groups of 128), side by side in one run. The int8 model is a GPTQ
checkpoint of that shape written here with random codes (the speed and memory of int8
inference do not depend on what the codes are; the quality of real codes is point 4c),
loaded by arenaflow from its qweight / qzeros / scales / g_idx like any GPTQ checkpoint;
the bf16 model is the same config with random weights (`--random-weights`, as the teacher
race). Both score the same ROWS rows of the real sample at max length 2,000
(device/race/gemma2_sample_2000.parquet from `benches/teacher_race.sh --prepare`), after a
warm-up, and report tokens/s and peak GPU memory from arenaflow's stats line.

    python3 benches/gpu_int8_speed.py BIN [ROWS]      # writes $OUT/int8-speed.jsonl
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq

CONFIG = "benches/configs/gemma-2-9b.json"
GROUP = 128
PROJECTIONS = {
    "self_attn.q_proj": lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"]),
    "self_attn.k_proj": lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]),
    "self_attn.v_proj": lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]),
    "self_attn.o_proj": lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"]),
    "mlp.gate_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "mlp.up_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "mlp.down_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
}


def bf16(a):
    """float32 -> bfloat16 bits (round to nearest even), as uint16 for safetensors' BF16."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors):
    """The safetensors format by hand (safetensors.numpy has no bfloat16): an 8-byte header
    length, the JSON header of dtypes, shapes and offsets, then the tensors' bytes."""
    header, offset = {}, 0
    for name, (dtype, array) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def write_int8_checkpoint(folder, rng):
    config = json.load(open(CONFIG))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": GROUP,
                                     "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    h = config["hidden_size"]
    tensors = {}
    raw = {}
    tensors["model.embed_tokens.weight"] = (rng.standard_normal((config["vocab_size"], h), dtype=np.float32) * 0.02)
    tensors["model.norm.weight"] = np.zeros(h, np.float32)
    tensors["score.weight"] = rng.standard_normal((3, h), dtype=np.float32) * 0.02
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}."
        for norm in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"]:
            tensors[p + norm + ".weight"] = np.zeros(h, np.float32)
        for name, shape in PROJECTIONS.items():
            out, inp = shape(config)
            groups = inp // GROUP
            q = p + name
            # 8 bits: 4 input rows per int32 word, the lowest row in the lowest byte.
            raw[q + ".qweight"] = rng.integers(0, 256, size=(inp, out), dtype=np.uint8).reshape(inp // 4, 4, out) \
                .transpose(0, 2, 1).copy().view(np.int32).reshape(inp // 4, out)
            raw[q + ".qzeros"] = np.full((groups, out // 4), 0x7F7F7F7F, np.int32)  # zero 128, stored as 127
            raw[q + ".scales"] = (rng.random((groups, out), dtype=np.float32) * 1e-3 + 5e-4).astype(np.float16)
            raw[q + ".g_idx"] = (np.arange(inp) // GROUP).astype(np.int32)
    out = {k: ("BF16", bf16(v)) for k, v in tensors.items()}
    out.update({k: ({np.int32: "I32", np.float16: "F16"}[v.dtype.type], v) for k, v in raw.items()})
    config["torch_dtype"] = "bfloat16"
    os.makedirs(folder, exist_ok=True)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=1)
    write_safetensors(os.path.join(folder, "model.safetensors"), out)
    return sum(v.nbytes for _, v in out.values())


def stats(bin_path, model, extra, rows, budget):
    cmd = [bin_path, "logits", "--model", model, "--dtype", "bf16", "--device", "cuda:0", "--input", rows,
           "--output", rows + f".{len(extra)}.out.parquet", "--max-batch-tokens", str(budget), "--warmup"] + extra
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("stats ")][-1]
    return json.loads(line[len("stats "):])


def main():
    bin_path = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    budget = int(os.environ.get("BUDGET", "16384"))
    work = tempfile.mkdtemp(dir=os.environ.get("STASH"))
    table = pq.read_table("device/race/gemma2_sample_2000.parquet")
    rows = os.path.join(work, "rows.parquet")
    pq.write_table(table.slice(0, count), rows)
    folder = os.path.join(work, "gemma2-9b-gptq8")
    size = write_int8_checkpoint(folder, np.random.default_rng(0))
    results = []
    for side, model, extra in [("bf16", CONFIG, ["--random-weights", "0"]), ("int8", folder, [])]:
        s = stats(bin_path, model, extra, rows, budget)
        s["side"] = side
        results.append(s)
    results[1]["checkpoint_bytes"] = size
    with open(os.path.join(os.environ.get("OUT", "."), "int8-speed.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    b, q = results
    print(f"gemma-2-9b shape, {count} rows at max 2,000 ({b['tokens']} tokens), budget {budget}: "
          f"bf16 {b['tokens_per_second']:.0f} tokens/s, peak {b['peak_memory_bytes'] / 2**30:.2f} GiB; "
          f"int8 {q['tokens_per_second']:.0f} tokens/s ({q['tokens_per_second'] / b['tokens_per_second']:.2f}x), "
          f"peak {q['peak_memory_bytes'] / 2**30:.2f} GiB (checkpoint {size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
