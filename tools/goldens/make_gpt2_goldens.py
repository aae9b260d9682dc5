"""Hugging Face goldens for the GPT-2 model tests. Run on the GPU machine,
where transformers is installed:

    python3 tools/goldens/make_gpt2_goldens.py --out tests/goldens/gpt2 \
        [--mini-wiki .data/gpt2-mini-wiki --wikitext .data/wiki.test.raw]

For several small random-initialised GPT2LMHeadModel shapes (head counts 1,
5 and 20; widths not multiples of 128) it writes, per shape and per weight
dtype (fp32, fp16):
  <name>-<dtype>/config.json, model.safetensors   (save_pretrained)
  <name>-<dtype>/golden.safetensors: input_ids, attention_mask [B,T] (right
     padding), logits [B,T,V] (fp32 forward of the saved weights), loss (the
     LM loss with labels = ids, -100 at padding), prompt and greedy ids.
With --mini-wiki it also scores WikiText-2 test perplexity with the recipe of
the transformers docs (joined with "\n\n", window 1024, stride 512), over the
whole file and over its first 4096 tokens, and writes perplexity.json.
"""
import argparse, json, math, os, sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    # name: (n_layer, n_embd, n_head, vocab, n_positions, extra config)
    "tiny-h5": (2, 40, 5, 1000, 64, {}),
    "narrow-h20": (3, 80, 20, 512, 48, {}),
    "wide-h1": (1, 72, 1, 300, 32, {}),
    "h3-inverse-layer-scale": (2, 48, 3, 400, 40, {"scale_attn_by_inverse_layer_idx": True}),
}


def golden_for(name, shape, dtype, out_root):
    n_layer, n_embd, n_head, vocab, n_pos, extra = shape
    torch.manual_seed(1234)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_pos,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1, **extra)
    model = GPT2LMHeadModel(cfg).eval()
    out = os.path.join(out_root, f"{name}-{dtype}")
    os.makedirs(out, exist_ok=True)
    if dtype == "fp16":
        model = model.half()
    model.save_pretrained(out, safe_serialization=True)
    # The reference forward runs in fp32 on the saved (possibly fp16-rounded) weights.
    model = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()

    g = torch.Generator().manual_seed(99)
    B, T = 3, min(13, n_pos)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    lengths = [T, T - 4, 1]  # right padding, including a single-token row
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = vocab - 1  # pad = eos, as the GPT-2 tokenizer is used
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        prompt = ids[:1, :5]
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                                pad_token_id=vocab - 1, eos_token_id=None)
    save_file({"input_ids": ids.to(torch.int32).contiguous(), "attention_mask": mask.to(torch.int32).contiguous(),
               "logits": res.logits.float().contiguous(), "loss": res.loss.float().reshape(1),
               "prompt_ids": prompt.to(torch.int32).contiguous(), "greedy_ids": greedy.to(torch.int32).contiguous()},
              os.path.join(out, "golden.safetensors"))
    print(f"{name}-{dtype}: loss {res.loss.item():.6f}, greedy {greedy.tolist()}", flush=True)


def wikitext_joined(path):
    # The HF `wikitext` loader yields each line with its newline, and "" for
    # blank lines; the docs then join the rows with "\n\n".
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(line if line.strip() else "")
    return "\n\n".join(rows)


def sliding_window(model, ids, max_length, stride, device):
    """The transformers docs' loop over windows; returns (exact nll sum, targets
    scored, the docs' nll sum, the docs' count). "Exact" scores every target
    once; the docs weight each window's mean loss by (targets - 1)."""
    seq_len = ids.size(1)
    docs_nll, docs_count = 0.0, 0
    exact_nll, exact_count = 0.0, 0
    prev_end = 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        window = ids[:, begin:end].to(device)
        target = window.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(window, labels=target)
            logits = out.logits[0, :-1].float()
            labels = target[0, 1:]
            valid = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum").item()
        n_valid = int((target != -100).sum().item()) - 1
        docs_nll += out.loss.item() * n_valid
        docs_count += n_valid
        exact_nll += nll
        exact_count += int(valid.sum().item())
        prev_end = end
        if end == seq_len:
            break
    return exact_nll, exact_count, docs_nll, docs_count


def perplexity(model_dir, wikitext, out_root, device):
    from transformers import GPT2TokenizerFast
    tok = GPT2TokenizerFast.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = tok(wikitext_joined(wikitext), return_tensors="pt").input_ids
    max_length, stride = 1024, 512
    exact_nll, exact_count, docs_nll, docs_count = sliding_window(model, ids, max_length, stride, device)
    res = {"model": os.path.basename(model_dir.rstrip("/")), "tokens": ids.size(1), "max_length": max_length,
           "stride": stride, "scored": exact_count, "nll_sum": exact_nll, "ppl": math.exp(exact_nll / exact_count),
           "ppl_docs_formula": math.exp(docs_nll / docs_count), "transformers": __import__("transformers").__version__,
           "torch": torch.__version__}
    # A prefix that a CPU test can afford: the first 4096 tokens, the same windows.
    prefix_nll, prefix_count, _, _ = sliding_window(model, ids[:, :4096], max_length, stride, device)
    res["prefix"] = {"tokens": 4096, "scored": prefix_count, "nll_sum": prefix_nll,
                     "ppl": math.exp(prefix_nll / prefix_count)}
    with open(os.path.join(out_root, "perplexity.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mini-wiki")
    ap.add_argument("--wikitext")
    ap.add_argument("--perplexity-only", action="store_true", help="rewrite perplexity.json alone")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(a.out, exist_ok=True)
    if not a.perplexity_only:
        for name, shape in SHAPES.items():
            for dtype in ("fp32", "fp16"):
                golden_for(name, shape, dtype, a.out)
    if a.mini_wiki and a.wikitext:
        perplexity(a.mini_wiki, a.wikitext, a.out, "cuda" if torch.cuda.is_available() else "cpu")
