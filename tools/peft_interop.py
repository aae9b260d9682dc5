"""PEFT interop check for our LoRA adapter files, both directions. Run on the
machine where transformers and peft are installed, after `peft_export export`:

    ./BUILD/tests/peft_export export OUT
    python3 tools/peft_interop.py OUT [--model tests/goldens/gpt2/tiny-h5-fp32]
    ./BUILD/tests/peft_export verify OUT

1. Ours -> PEFT: loads OUT/adapter (written by our save_lora_peft) with
   PeftModel.from_pretrained on the same HF model and compares its logits with
   OUT/ours.safetensors at every non-padded position (tolerance 1e-4).
2. PEFT -> ours: makes a fresh PEFT LoRA (other rank, alpha and targets, with
   non-zero lora_B), saves it with save_pretrained to OUT/peft_adapter and its
   logits on the same batch to OUT/peft_logits.safetensors, for
   `peft_export verify` to load and compare.
Exits non-zero when a check fails; prints the max differences either way.
"""
import argparse
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

TOLERANCE = 1e-4


def base_model(model_dir):
    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def max_difference(a, b, mask):
    keep = mask.bool()
    return (a.float() - b.float())[keep].abs().max().item()


def ours_to_peft(out_dir, model_dir):
    ours = load_file(os.path.join(out_dir, "ours.safetensors"))
    ids, mask = ours["input_ids"].long(), ours["attention_mask"].long()
    adapter_dir = os.path.join(out_dir, "adapter")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        written = json.load(f)
    model = PeftModel.from_pretrained(base_model(model_dir), adapter_dir).eval()
    config = model.peft_config["default"]
    scaling = config.lora_alpha / config.r
    print(f"ours -> peft: r {config.r}, lora_alpha {config.lora_alpha} (scaling {scaling}), "
          f"targets {sorted(config.target_modules)}, fan_in_fan_out {config.fan_in_fan_out}", flush=True)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert adapted, "PEFT adapted no module"
    nonzero_b = sum(int(m.lora_B["default"].weight.abs().sum() > 0) for n, m in model.named_modules()
                    if hasattr(m, "lora_B") and "default" in m.lora_B)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits
    diff = max_difference(logits, ours["logits"], mask)
    effect = max_difference(logits, plain, mask)
    print(f"ours -> peft: {len(adapted)} adapted modules, {nonzero_b} with non-zero lora_B; "
          f"adapter changes logits by up to {effect:.3g}; max |ours - peft| = {diff:.3g} "
          f"(tolerance {TOLERANCE})", flush=True)
    ok = diff <= TOLERANCE and nonzero_b == len(adapted) and effect > 10 * TOLERANCE
    ok = ok and written["peft_type"] == "LORA" and written["fan_in_fan_out"] is True
    return ok, ids, mask


def peft_to_ours(out_dir, model_dir, ids, mask):
    torch.manual_seed(5)
    config = LoraConfig(r=3, lora_alpha=4.5, target_modules=["attn.c_attn", "attn.c_proj"], lora_dropout=0.0,
                        bias="none", fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(base_model(model_dir), config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0.0, 0.05)
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(os.path.join(out_dir, "peft_adapter"))
    save_file({"input_ids": ids.to(torch.int32).contiguous(), "attention_mask": mask.to(torch.int32).contiguous(),
               "logits": logits.float().contiguous()}, os.path.join(out_dir, "peft_logits.safetensors"))
    print(f"peft -> ours: wrote {out_dir}/peft_adapter and peft_logits.safetensors "
          f"(r 3, lora_alpha 4.5, scaling {4.5 / 3}); run `peft_export verify {out_dir}`", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--model", default="tests/goldens/gpt2/tiny-h5-fp32")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    ok, ids, mask = ours_to_peft(a.out_dir, a.model)
    peft_to_ours(a.out_dir, a.model, ids, mask)
    print("peft interop: ours -> peft", "OK" if ok else "FAILED", flush=True)
    sys.exit(0 if ok else 1)
