"""The torch + PEFT side of the training parity bench (issue 15, point 4; run by
benches/train_parity.sh on the GPU machine): a plain loop over the same rows, from the same
initial adapter, in the same order as arenaflow's `train --no-shuffle`, and the dev log
loss at the same steps. Prints one JSON line per step and per evaluation.

The loop is the one users run: the base in bf16 (transformers' *ForSequenceClassification,
sdpa), PeftModel.from_pretrained(is_trainable=True) on the initial adapter (LoRA and the
score head, PEFT's f32 adapter weights), torch.optim.AdamW, transformers'
get_cosine_schedule_with_warmup, clip_grad_norm_, the mean cross-entropy of each step's rows
(one padded batch, right padding, the last real token pooled by the model). Steps are cut
as arenaflow cuts them: the rows grouped by id in file order (both orders of a comparison in
one step), up to --batch-rows a step, the file repeated for as many epochs as the steps need.

    python3 benches/train_parity.py --base BASE_DIR --adapter INIT_ADAPTER --rows ROWS.parquet \
        --steps 200 --eval-every 50 [--autocast]

--autocast runs every forward under torch.autocast(bf16), as transformers' Trainer does with
bf16=True: the LoRA matmuls (and the score head's) in bf16 (arenaflow's --lora-autocast; its
score head stays f32).
"""

import argparse
import contextlib
import json
import math

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, get_cosine_schedule_with_warmup


def steps_of(ids, batch_rows, steps):
    """arenaflow's plan_steps without shuffling: units (rows of one id, in order of first
    appearance) packed into steps of at most batch_rows rows, epochs repeated."""
    units, index = [], {}
    for i, id_ in enumerate(ids):
        if id_ in index:
            units[index[id_]].append(i)
        else:
            index[id_] = len(units)
            units.append([i])
    plan = []
    while len(plan) < steps:
        current = []
        for unit in units:
            if current and len(current) + len(unit) > batch_rows:
                plan.append(current)
                current = []
                if len(plan) == steps:
                    return plan
            current = current + unit
        if current:
            plan.append(current)
    return plan[:steps]


def batch(rows, pad_id, device):
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="arenaflow merge's folder of the base + initial head")
    p.add_argument("--adapter", required=True, help="the initial PEFT adapter")
    p.add_argument("--rows", required=True, help="benches/parity_rows.sql's parquet")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-rows", type=int, default=16, help="rows per evaluation batch")
    p.add_argument("--autocast", action="store_true", help="forward under torch.autocast(bf16)")
    args = p.parse_args()

    table = pq.read_table(args.rows).to_pydict()
    train = [i for i, s in enumerate(table["split"]) if s == "train"]
    dev = [i for i, s in enumerate(table["split"]) if s == "dev"]
    ids = [table["id"][i] for i in train]
    plan = steps_of(ids, args.batch_rows, args.steps)

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.base, torch_dtype=torch.bfloat16, attn_implementation="sdpa").to("cuda")
    # arenaflow pads with the model's pad id (SmolLM2's GGUF: 2, which is also its EOS, the
    # template's last token) and pools the rightmost token that is not the pad id; so does
    # transformers (>= 4.48): the same id on both sides pools the same token.
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert (major, minor) >= (4, 48), f"transformers {transformers.__version__} pools another token"
    pad_id = model.config.pad_token_id
    assert pad_id is not None, "the merged config names no pad id"
    model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    # arenaflow trains the score head in f32 on the f32 pooled state; PEFT's modules_to_save
    # copy is the base's bf16 layer (the adapter's f32 head rounded into it): make it f32
    # again from the adapter's own weight, and feed it f32.
    from safetensors.torch import load_file
    saved = load_file(f"{args.adapter}/adapter_model.safetensors")
    head_key = next(k for k in saved if k.endswith("score.weight"))
    head = model.base_model.model.score.modules_to_save["default"]
    head.float()
    with torch.no_grad():
        head.weight.copy_(saved[head_key].float())
    head.register_forward_pre_hook(lambda _m, inputs: tuple(x.float() for x in inputs))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    warmup = math.ceil(args.warmup_ratio * args.steps)
    schedule = get_cosine_schedule_with_warmup(opt, warmup, args.steps)
    print(json.dumps({"side": "torch+peft", "train_rows": len(train), "dev_rows": len(dev),
                      "steps": len(plan), "warmup": warmup,
                      "trainable": sum(p.numel() for p in params),
                      "dtypes": sorted({str(p.dtype) for p in params})}), flush=True)

    def precision():
        if args.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(step):
        model.eval()
        total, hits = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(dev), args.eval_rows):
                part = dev[s : s + args.eval_rows]
                x, m = batch([table["input_ids"][i] for i in part], pad_id, "cuda")
                with precision():
                    logits = model(input_ids=x, attention_mask=m).logits.float()
                labels = torch.tensor([table["label"][i] for i in part], device="cuda")
                total += F.cross_entropy(logits, labels, reduction="sum").item()
                hits += (logits.argmax(-1) == labels).sum().item()
        model.train()
        print(json.dumps({"kind": "eval", "step": step, "dev_log_loss": total / len(dev),
                          "dev_accuracy": hits / len(dev)}), flush=True)

    model.train()
    for step, rows in enumerate(plan, start=1):
        x, m = batch([table["input_ids"][train[i]] for i in rows], pad_id, "cuda")
        labels = torch.tensor([table["label"][train[i]] for i in rows], device="cuda")
        with precision():
            logits = model(input_ids=x, attention_mask=m).logits.float()
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = schedule.get_last_lr()[0]
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        print(json.dumps({"kind": "step", "step": step, "loss": loss.item(),
                          "grad_norm": norm.item(), "lr": lr, "rows": len(rows)}), flush=True)
        if args.eval_every and step % args.eval_every == 0:
            evaluate(step)
    if not args.eval_every or args.steps % args.eval_every:
        evaluate(args.steps)


if __name__ == "__main__":
    main()
