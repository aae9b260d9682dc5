"""PyTorch goldens for the CURLoRA and LoRA adapter tests. Run on the GPU
machine, where transformers is installed (it runs on the CPU, in float64):

    python3 tools/goldens/make_adapter_goldens.py \
        --model tests/goldens/gpt2/tiny-h5-fp32 --out tests/goldens/adapters

On the small random GPT-2 in --model it wraps the targeted Conv1D layers of
transformers' GPT2LMHeadModel in modules that compute the paper's formulas,

    CURLoRA: y = base(x) + alpha * ((x C) U) R,  C = W[:, cols], R = W[rows, :]
    LoRA:    y = base(x) + alpha * (x A) B,

with W as HF stores it ([in, out]), FIXED column/row indices (drawn here
with a seeded torch generator, one index repeated on purpose, as sampling
with replacement does) and NON-ZERO U, A, B (scaled so that ||ΔW|| is half
of ||W||). It then writes, in float64 unless noted:

  curlora.safetensors: input_ids, attention_mask (int32, right padding),
      loss [1], logits (float32), and per adapted layer <name>.cols,
      <name>.rows (int32), <name>.U, <name>.grad_U (the gradient of the loss);
      plus <name>.col_probs and <name>.row_probs for one layer: the reference
      code's compute_selection_probabilities followed by its smoothed
      inversion 1/(p + 0.001), normalised.
  lora.safetensors: the same batch, loss, logits, and per layer <name>.A
      [in, r], <name>.B [r, out], <name>.grad_A, <name>.grad_B.

The loss is transformers' LM loss with labels = input_ids, -100 at padding,
computed in float64 from the logits (transformers' own loss casts to float32).
Metadata records alpha, rank, targets and the library versions.
"""
import argparse
import json
import os
import types

import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

CURLORA = {"targets": ["attn.c_attn", "mlp.c_proj"], "rank": 3, "alpha": 1.5}
LORA = {"targets": ["attn.c_attn", "attn.c_proj"], "rank": 4, "alpha": 0.75}
BATCH, TIME, PAD_FROM = 2, 9, 6  # row 1 holds PAD_FROM real tokens, then padding


class CurLoRAConv1D(torch.nn.Module):
    def __init__(self, base, cols, rows, U, alpha):
        super().__init__()
        self.base = base
        W = base.weight.detach()  # Conv1D: [in, out]
        self.register_buffer("C", W[:, cols].clone())
        self.register_buffer("R", W[rows, :].clone())
        self.U = torch.nn.Parameter(U.clone())
        self.alpha = alpha

    def forward(self, x):
        return self.base(x) + self.alpha * (((x @ self.C) @ self.U) @ self.R)


class LoRAConv1D(torch.nn.Module):
    def __init__(self, base, A, B, alpha):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(A.clone())
        self.B = torch.nn.Parameter(B.clone())
        self.alpha = alpha

    def forward(self, x):
        return self.base(x) + self.alpha * ((x @ self.A) @ self.B)


def reference_probabilities(W, eps=0.001):
    # The reference code's compute_selection_probabilities and
    # select_indices_with_replacement's inversion, in float64.
    column_norms_squared = torch.sum(W ** 2, axis=0)
    row_norms_squared = torch.sum(W ** 2, axis=1)
    total = torch.sum(column_norms_squared)
    out = []
    for p in (column_norms_squared / total, row_norms_squared / total):
        inverted = 1 / (p + eps)
        out.append(inverted / inverted.sum())
    return out


def load_model(model_dir):
    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager")
    model = model.double().eval()  # eval: no dropout
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def targeted(model, targets):
    names = []
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    assert names, f"no module matches {targets}"
    return names


def replace(model, name, module):
    parent_name, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent_name), leaf, module)


def batch(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (BATCH, TIME), generator=g)
    mask = torch.ones(BATCH, TIME, dtype=torch.long)
    mask[1, PAD_FROM:] = 0
    ids[1, PAD_FROM:] = vocab - 1  # pad = eos, as with the GPT-2 tokenizer
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def half_of_weight(W, delta):
    # The factor that makes ||delta|| half of ||W||: a visible, not dominant, change.
    return 0.5 * W.norm() / delta.norm()


def run(model, ids, mask, labels):
    # transformers' causal-LM loss (shift by one, ignore -100, mean), computed
    # here because its ForCausalLMLoss casts logits to float32, which would
    # spoil a float64 golden.
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    return types.SimpleNamespace(loss=loss, logits=logits)


def common_tensors(ids, mask, out):
    return {"input_ids": ids.to(torch.int32).contiguous(), "attention_mask": mask.to(torch.int32).contiguous(),
            "loss": out.loss.detach().reshape(1).contiguous(), "logits": out.logits.detach().float().contiguous()}


def metadata(model_dir, spec):
    import transformers
    return {"model": os.path.relpath(os.path.abspath(model_dir), os.getcwd()), "targets": json.dumps(spec["targets"]),
            "rank": str(spec["rank"]), "alpha": repr(spec["alpha"]), "torch": torch.__version__,
            "transformers": transformers.__version__}


def curlora_golden(model_dir, out_dir):
    model = load_model(model_dir)
    r, alpha = CURLORA["rank"], CURLORA["alpha"]
    g = torch.Generator().manual_seed(2408)
    tensors = {}
    names = targeted(model, CURLORA["targets"])
    for i, name in enumerate(names):
        base = model.get_submodule(name)
        W = base.weight.detach()
        m, n = W.shape
        cols = torch.randint(0, n, (r,), generator=g)
        rows = torch.randperm(m, generator=g)[:r]
        cols[-1] = cols[0]  # a repeated column, as sampling with replacement gives
        U0 = torch.randn(r, r, generator=g, dtype=torch.float64)
        U = U0 * half_of_weight(W, W[:, cols] @ U0 @ W[rows, :])
        replace(model, name, CurLoRAConv1D(base, cols, rows, U, alpha))
        tensors[f"{name}.cols"] = cols.to(torch.int32)
        tensors[f"{name}.rows"] = rows.to(torch.int32)
        tensors[f"{name}.U"] = U
        if i == 0:
            col_probs, row_probs = reference_probabilities(W)
            tensors[f"{name}.col_probs"] = col_probs
            tensors[f"{name}.row_probs"] = row_probs
    ids, mask, labels = batch(model.config.vocab_size)
    out = run(model, ids, mask, labels)
    for name in names:
        tensors[f"{name}.grad_U"] = model.get_submodule(name).U.grad.detach().clone()
    tensors.update(common_tensors(ids, mask, out))
    path = os.path.join(out_dir, "curlora.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata(model_dir, CURLORA))
    print(f"curlora: {len(names)} layers, loss {out.loss.item():.12f} -> {path}", flush=True)


def lora_golden(model_dir, out_dir):
    model = load_model(model_dir)
    r, alpha = LORA["rank"], LORA["alpha"]
    g = torch.Generator().manual_seed(1474560)
    tensors = {}
    names = targeted(model, LORA["targets"])
    for name in names:
        base = model.get_submodule(name)
        W = base.weight.detach()
        m, n = W.shape
        bound = 1 / r ** 0.5  # kaiming_uniform_(a=sqrt(5)) on [in, r]: fan_in = r
        A = (torch.rand(m, r, generator=g, dtype=torch.float64) * 2 - 1) * bound
        B0 = torch.randn(r, n, generator=g, dtype=torch.float64)
        B = B0 * half_of_weight(W, A @ B0)
        replace(model, name, LoRAConv1D(base, A, B, alpha))
        tensors[f"{name}.A"] = A
        tensors[f"{name}.B"] = B
    ids, mask, labels = batch(model.config.vocab_size)
    out = run(model, ids, mask, labels)
    for name in names:
        module = model.get_submodule(name)
        tensors[f"{name}.grad_A"] = module.A.grad.detach().clone()
        tensors[f"{name}.grad_B"] = module.B.grad.detach().clone()
    tensors.update(common_tensors(ids, mask, out))
    path = os.path.join(out_dir, "lora.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata(model_dir, LORA))
    print(f"lora: {len(names)} layers, loss {out.loss.item():.12f} -> {path}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tests/goldens/gpt2/tiny-h5-fp32")
    ap.add_argument("--out", default="tests/goldens/adapters")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    os.makedirs(a.out, exist_ok=True)
    curlora_golden(a.model, a.out)
    lora_golden(a.model, a.out)
