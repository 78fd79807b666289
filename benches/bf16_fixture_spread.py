"""How far bf16 alone moves the training fixtures' loss and gradients in transformers + PEFT
(issue 15: the bound of `cuda_bf16_gradients_track_the_cpu_f32_ones`).

The CUDA gradient test holds arenaflow's bf16 gradients on the GPU to twice the error of
arenaflow's bf16 on the CPU, both against f32. On the gemma2 fixture that CPU error moved
from 0.51 to 0.35 (whole gradient, relative) with a change of rounding order alone, and the
bf16 loss from 4.27 to 3.59 (f32: 4.14). This script measures the same figures for PyTorch,
an implementation of its own: the fixture rows and adapters of
tests/fixtures/training/make_training_fixtures.py, the base model in bf16 with PEFT's f32
adapter (autocast_adapter_dtype, as arenaflow), on the CPU and on CUDA where there is one,
right and left padding; one JSON line per case. Run on the GPU machine (PyTorch,
transformers and PEFT installed):

    python3 benches/bf16_fixture_spread.py
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "training"))
import make_training_fixtures as fx  # noqa: E402


def gradients(family, side, dtype, device):
    base = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(fx.MODELS, family, "base"), attn_implementation="eager", dtype=dtype
    ).to(device)
    model = PeftModel.from_pretrained(base, os.path.join(fx.MODELS, family, "adapter"), is_trainable=True)
    model.eval()  # dropout off; gradients still flow
    ids, mask = fx.pad(fx.ROWS, side)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    loss = F.cross_entropy(logits, torch.tensor(fx.LABELS, device=device))
    loss.backward()
    grads = {fx.saved_name(n): p.grad.detach().float().cpu().flatten() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for family in ("llama", "qwen2", "gemma2"):
        for side in ("right", "left"):
            ref_loss, ref = gradients(family, side, torch.float32, "cpu")
            for device in devices:
                loss, got = gradients(family, side, torch.bfloat16, device)
                names = sorted(ref)
                whole = relative(torch.cat([got[n] for n in names]), torch.cat([ref[n] for n in names]))
                worst = max(names, key=lambda n: relative(got[n], ref[n]))
                print(json.dumps(dict(
                    family=family, side=side, device=device, f32_loss=round(ref_loss, 5),
                    bf16_loss=round(loss, 5), whole_gradient_off_f32=round(whole, 4),
                    worst_tensor=worst, worst_off_f32=round(relative(got[worst], ref[worst]), 4),
                )), flush=True)


if __name__ == "__main__":
    main()
