"""The PyTorch side of the teacher-forward race (benches/teacher_race.sh runs it on the GPU
machine): transformers' LlamaForSequenceClassification / Gemma2ForSequenceClassification in
bf16 with random weights and a real config, over the same rows and the same batches as
arenaflow (longest first, as many rows per batch as fit the padded token budget, right
padding), timed after one warm-up batch. Prints one JSON line.

`--attn sdpa-unmasked` is torch at its best for right-padded batches: sdpa with no
attention mask (its causal flash path). A causal classifier that pools its last real token
does not need the mask: padding sits after every real token, so no real token sees it. The
batch with the most padding is also run masked, and the largest logit difference between
the two is reported (`unmasked_vs_masked`), beside the largest logit (`largest_logit`).

    python3 benches/teacher_race.py --config benches/configs/llama-3.1-8b.json \
        --attn sdpa --rows rows.npz --max-batch-tokens 8192
"""

import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification


def batches(lengths, budget):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable, like Rust's
    out, start = [], 0
    while start < len(order):
        fit = max(1, budget // max(1, lengths[order[start]]))
        out.append(order[start:start + fit])
        start += fit
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--attn", required=True, choices=["sdpa", "sdpa-unmasked", "eager"])
    p.add_argument("--rows", required=True, help="npz with `lengths` and flat `tokens`")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--label", default="")
    args = p.parse_args()

    data = np.load(args.rows)
    lengths = data["lengths"].astype(np.int64).tolist()
    flat = data["tokens"].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = [flat[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]

    config = AutoConfig.from_pretrained(args.config)
    unmasked = args.attn == "sdpa-unmasked"
    config._attn_implementation = "sdpa" if unmasked else args.attn
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
    model.eval()
    pad = config.pad_token_id

    planned = batches(lengths, args.max_batch_tokens)
    tensors, masks = [], []
    for members in planned:
        longest = max(lengths[i] for i in members)
        ids = torch.full((len(members), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(members), longest), dtype=torch.long)
        for r, i in enumerate(members):
            ids[r, : lengths[i]] = torch.from_numpy(rows[i])
            mask[r, : lengths[i]] = 1
        tensors.append((ids.cuda(), None if unmasked else mask.cuda()))
        masks.append(mask)

    with torch.inference_mode():
        model(input_ids=tensors[0][0], attention_mask=tensors[0][1]).logits.float().cpu()
        difference = scale = None
        if unmasked:  # on the batch with the most padding
            b = max(range(len(masks)), key=lambda b: int((masks[b] == 0).sum()))
            ids = tensors[b][0]
            bare = model(input_ids=ids).logits.float().cpu()
            masked = model(input_ids=ids, attention_mask=masks[b].cuda()).logits.float().cpu()
            difference = float((bare - masked).abs().max())
            scale = float(masked.abs().max())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        finite = True
        for ids, mask in tensors:
            logits = model(input_ids=ids, attention_mask=mask).logits
            finite &= bool(torch.isfinite(logits).all())
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    free, total = torch.cuda.mem_get_info()
    tokens = int(sum(lengths))
    padded = int(sum(max(lengths[i] for i in m) * len(m) for m in planned))
    print(json.dumps({
        "side": f"torch {args.attn}", "label": args.label, "config": args.config,
        "rows": len(lengths), "tokens": tokens, "padded_tokens": padded,
        "batches": len(planned), "seconds": seconds,
        "tokens_per_second": tokens / seconds, "rows_per_second": len(lengths) / seconds,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "finite": finite, "unmasked_vs_masked": difference, "largest_logit": scale, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
    }), flush=True)


if __name__ == "__main__":
    main()
