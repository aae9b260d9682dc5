"""The peer of bench_cuda's attention rows: torch.nn.functional.scaled_dot_product_attention
at the same shapes (B 32, H 20, T 256, D 64, causal; and the eval's B 8, T 1024), timed the same way (median of 10
forwards; median of 5 forward+backward pairs, minus the forward). Run it in the same
device call as build-gpu/bench/bench_cuda:
    python3 bench/torch_sdpa.py
Prints one JSON line per case, with the backend torch picked where it says."""
import json, statistics, time

import torch
import torch.nn.functional as F


def median_seconds(warmup, reps, fn):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case(B, H, T, D, dtype, dropout):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    with torch.no_grad():
        forward = median_seconds(5, 10, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              dropout_p=dropout))
    for t in (q, k, v):
        t.requires_grad_(True)

    def both():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout).backward(dout)

    backward = median_seconds(5, 5, both) - forward
    flops = 4.0 * B * H * T * T * D * 0.5
    print(json.dumps({"bench": "torch_sdpa", "B": B, "H": H, "T": T, "D": D, "dtype": str(dtype).split(".")[-1],
                      "causal": True, "dropout": dropout, "forward_ms": round(forward * 1e3, 3),
                      "forward_tflops": round(flops / forward * 1e-12, 1), "backward_ms": round(backward * 1e3, 3),
                      "backward_tflops": round(2.5 * flops / backward * 1e-12, 1), "torch": torch.__version__}),
          flush=True)


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        for dropout in (0.0, 0.1):
            case(32, 20, 256, 64, dtype, dropout)
    case(8, 20, 1024, 64, torch.bfloat16, 0.1)  # the eval forward's shape
