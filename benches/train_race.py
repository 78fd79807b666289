"""The PyTorch side of the training race (benches/train_race.sh runs it on the GPU
machine): transformers' *ForSequenceClassification in bf16 with random weights and a real
config, PEFT LoRA (r, alpha on all seven projections, dropout 0, score head trained),
torch.optim.AdamW, gradient checkpointing on, over the same rows as arenaflow (8 rows a
step, padded to the step's longest on the right). Times each optimizer step after one
warm-up step and prints one JSON line: the median step, tokens/s as the timed steps'
unpadded tokens over their seconds, each step's time and tokens, peak memory.

    python3 benches/train_race.py --config benches/configs/llama-3.1-8b.json --attn sdpa \
        --rows rows.npz --steps 5 --r 64 --alpha 128
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--attn", required=True, choices=["sdpa", "eager"])
    p.add_argument("--rows", required=True, help="npz with `lengths` and flat `tokens`")
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--label", default="")
    args = p.parse_args()

    data = np.load(args.rows)
    lengths = data["lengths"].astype(np.int64).tolist()
    flat = data["tokens"].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = [flat[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]

    config = AutoConfig.from_pretrained(args.config)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, torch_dtype=torch.bfloat16)
    model = model.to_empty(device="cuda")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0 if config.model_type != "gemma2" else 0.0)
            else:
                param.normal_(0.0, 0.02)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(task_type="SEQ_CLS", r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for n, prm in model.named_parameters():
        if prm.requires_grad:
            prm.data = prm.data.float()
    model.train()
    params = [prm for prm in model.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(0)
    labels_all = torch.randint(0, 3, (len(rows),), generator=g)

    def step(k):
        members = [(k * args.batch_rows + i) % len(rows) for i in range(args.batch_rows)]
        longest = max(len(rows[i]) for i in members)
        ids = torch.full((len(members), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(members), longest), dtype=torch.long)
        for j, i in enumerate(members):
            ids[j, : len(rows[i])] = torch.from_numpy(rows[i])
            mask[j, : len(rows[i])] = 1
        ids, mask = ids.cuda(), mask.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels_all[members].cuda())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(rows[i]) for i in members), loss.item()

    step(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for k in range(1, args.steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n, _ = step(k)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    median = statistics.median(times)
    print(json.dumps({
        "side": "torch+peft", "label": args.label, "attn": args.attn,
        "checkpointing": not args.no_checkpointing, "r": args.r,
        "median_step_s": median, "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        # What arenaflow reports is the device's memory in use (as nvidia-smi counts it:
        # context and allocator caches included); torch's nearest figures are these two.
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "device_in_use_gib": (lambda f, t: (t - f) / 2**30)(*torch.cuda.mem_get_info()),
        "steps": times, "step_tokens": tokens,
    }))


if __name__ == "__main__":
    main()
