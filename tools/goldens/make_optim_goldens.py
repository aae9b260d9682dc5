#!/usr/bin/env python3
"""Writes tests/goldens/optim/optim.json for tests/test_optim.cpp.

Trajectories of torch.optim.AdamW and torch.optim.SGD on small tensors with
fixed gradients, and torch.nn.utils.clip_grad_norm_ results. Every number the
C++ test compares against comes from torch here; inputs are stored too, so the
test feeds exactly the same values. f32 inputs are stored as the doubles they
are, so nothing is lost in JSON.

Run from the repository root: python3 tools/goldens/make_optim_goldens.py
(tested with PyTorch 1.13, CPU).
"""
import json
import math
import pathlib

import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "goldens" / "optim" / "optim.json"


def number(x):
    """A JSON number, or "inf" / "-inf" / "nan": strict JSON has no non-finite numbers."""
    x = float(x)
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def values(t):
    return [number(x) for x in t.detach().double().flatten().tolist()]


def inputs(dtype, size, steps, seed, skip_steps=()):
    """Initial parameter and per-step gradients (None where a step has none)."""
    gen = torch.Generator().manual_seed(seed)
    initial = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype)
    grads = []
    for step in range(steps):
        g = torch.randn(size, generator=gen, dtype=torch.float64)
        # Mixed magnitudes: tiny gradients make eps matter, large ones do not.
        g = g * torch.tensor([10.0 ** (k % 5 - 3) for k in range(size)], dtype=torch.float64)
        grads.append(None if step in skip_steps else g.to(dtype))
    return initial, grads


def trajectory(make_optimizer, initial, grads):
    p = initial.clone().requires_grad_(True)
    opt = make_optimizer([p])
    out = []
    for g in grads:
        p.grad = None if g is None else g.clone()
        opt.step()
        out.append(values(p))
    return out


def optimizer_case(name, kind, dtype, options, size, steps, seed, skip_steps=()):
    initial, grads = inputs(dtype, size, steps, seed, skip_steps)
    if kind == "adamw":
        make = lambda params: torch.optim.AdamW(params, **options)  # noqa: E731
    else:
        make = lambda params: torch.optim.SGD(params, **options)  # noqa: E731
    return {
        "name": name,
        "kind": kind,
        "dtype": "f32" if dtype == torch.float32 else "f64",
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "initial": values(initial),
        "grads": [None if g is None else values(g) for g in grads],
        "expected": trajectory(make, initial, grads),
    }


def clip_case(name, dtype, sizes, max_norm, seed, scale=1.0, poison=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.zeros(n, dtype=dtype, requires_grad=True) for n in sizes]
    grads = []
    for p in params:
        g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        grads.append(g)
    if poison is not None:
        grads[0][1] = poison
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return {
        "name": name,
        "dtype": "f32" if dtype == torch.float32 else "f64",
        "max_norm": max_norm,
        "grads": [values(g) for g in grads],
        "total_norm": number(total),
        "clipped": [values(p.grad) for p in params],
    }


def main():
    f64, f32 = torch.float64, torch.float32
    cases = [
        optimizer_case("adamw_defaults_f64", "adamw", f64, {}, 7, 5, 1),
        optimizer_case("adamw_no_decay_f64", "adamw", f64, {"lr": 1e-2, "weight_decay": 0.0}, 7, 5, 2),
        optimizer_case("adamw_custom_f64", "adamw", f64,
                       {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1}, 7, 5, 3),
        optimizer_case("adamw_skip_f64", "adamw", f64, {"lr": 1e-2}, 5, 4, 4, skip_steps=(1,)),
        optimizer_case("adamw_defaults_f32", "adamw", f32, {"lr": 1e-2}, 40, 6, 5),
        optimizer_case("sgd_plain_f64", "sgd", f64, {"lr": 0.1}, 7, 4, 6),
        optimizer_case("sgd_momentum_f64", "sgd", f64,
                       {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}, 7, 4, 7),
        optimizer_case("sgd_nesterov_f64", "sgd", f64,
                       {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02}, 7, 4, 8),
        optimizer_case("sgd_momentum_f32", "sgd", f32, {"lr": 0.1, "momentum": 0.9}, 7, 4, 9),
    ]
    clips = [
        clip_case("clipped_f64", f64, [5, 3, 4], 1.0, 10),
        clip_case("not_clipped_f64", f64, [5, 3], 100.0, 11),
        clip_case("clipped_f32", f32, [6, 2], 0.5, 12),
        clip_case("inf_f64", f64, [3, 2], 1.0, 13, poison=math.inf),
        clip_case("nan_f64", f64, [3, 2], 1.0, 14, poison=math.nan),
    ]
    doc = {"generator": "tools/goldens/make_optim_goldens.py", "torch": torch.__version__,
           "optimizers": cases, "clip_grad_norm": clips}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
