"""Peak GPU memory of the PyTorch peer's training step, which the peer itself
does not report. It builds the peer's own model (torch_reference.build, the
curlora-factored adapter) and runs its own step (time_train) after resetting
torch's peak counter, so the peak covers the weights, activations, gradients
and AdamW state, as bench_step's peak_bytes does for ours.
    python3 bench/torch_peak_memory.py gpt2,gpt2-large [PEER_DIR]
Prints one JSON line per (size, precision)."""
import json
import sys

sizes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["gpt2", "gpt2-large"]
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/bench")
import torch  # noqa: E402
import torch_reference as peer  # noqa: E402

for size in sizes:
    for amp, tf32 in [(False, False), (False, True), (True, False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = peer.build(size, "curlora-factored", 8)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        peer.time_train(m, 32, 256, 2, amp)
        peak = torch.cuda.max_memory_allocated()
        print(json.dumps(dict(size=size, amp_bf16=amp, tf32=tf32, peak_bytes=peak, peak_gib=round(peak / 2**30, 2))),
              flush=True)
        del m
        torch.cuda.empty_cache()
