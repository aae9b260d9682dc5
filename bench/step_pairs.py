"""Our training step and the PyTorch peer's, in alternating rounds, for a ratio
that one noisy run of either cannot tip: on the H200 a run of the peer moves by
about 1% from one device call to the next, as much as a close target's margin.
Each round runs bench_step once (a fresh process: 3 warm-up steps, then 10
timed, as the peer times) and then the peer's own time_train on its own model
(torch_reference.build, built once and kept). Prints a JSON line per round and
a summary line with both medians and the ratio of the medians (torch / ours:
above 1 means ours is faster).
    python3 bench/step_pairs.py [--size gpt2-large] [--precision bf16|tf32|fp32]
        [--rounds 5] [--bench build-gpu/bench/bench_step] [--peer-dir ../shared/bench]"""
import argparse
import json
import statistics
import subprocess
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--size", default="gpt2-large")
parser.add_argument("--precision", default="bf16", choices=["bf16", "tf32", "fp32"])
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--bench", default="build-gpu/bench/bench_step")
parser.add_argument("--peer-dir", default="../shared/bench")
args = parser.parse_args()

sys.path.insert(0, args.peer_dir)
import torch  # noqa: E402
import torch_reference as peer  # noqa: E402

amp, tf32 = args.precision == "bf16", args.precision == "tf32"
torch.backends.cuda.matmul.allow_tf32 = tf32
torch.backends.cudnn.allow_tf32 = tf32
ours_cmd = [args.bench, "--device", "cuda", "--model", args.size] + ({"bf16": ["--bf16"], "tf32": ["--tf32"]}
                                                                     .get(args.precision, []))
model = peer.build(args.size, "curlora-factored", 8)

ours_s, torch_s = [], []
for r in range(args.rounds):
    run = subprocess.run(ours_cmd, capture_output=True, text=True, check=True)
    ours = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")][-1]
    ours_s.append(ours["train_step_s"])
    torch_s.append(peer.time_train(model, 32, 256, 10, amp)[0])
    print(json.dumps(dict(round=r, ours_s=round(ours_s[-1], 5), torch_s=round(torch_s[-1], 5),
                          ratio=round(torch_s[-1] / ours_s[-1], 3))), flush=True)

ours_median, torch_median = statistics.median(ours_s), statistics.median(torch_s)
ratios = [t / o for o, t in zip(ours_s, torch_s)]
print(json.dumps(dict(size=args.size, precision=args.precision, rounds=args.rounds, command=" ".join(ours_cmd),
                      ours_median_s=round(ours_median, 5), torch_median_s=round(torch_median, 5),
                      ratio_of_medians=round(torch_median / ours_median, 3), ratio_min=round(min(ratios), 3),
                      ratio_max=round(max(ratios), 3))), flush=True)
