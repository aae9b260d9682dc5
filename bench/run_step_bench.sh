#!/usr/bin/env bash
# One GPT-2 adapter training step, ours (bench_step) beside the PyTorch peer for
# the same shapes, in one invocation; prints both JSON streams and a table of
# ratios (ours over torch in tokens/s: above 1 means ours is faster).
#   bench/run_step_bench.sh gpu   # gpt2, gpt2-large; CURLoRA b32 x t256, eval b8 x t1024
#   bench/run_step_bench.sh cpu   # gpt2-mini-wiki, b8 x t128, 2 threads
# Settings (environment):
#   BUILD        our build folder, relative to the repo root (default build)
#   PEER_DIR     folder of torch_reference.py and torch_cpu_reference.py (default ../shared/bench)
#   PEER_PYTHON  python with torch + transformers for the GPU peer (default python3)
#   CPU_PYTHON   python with torch for the CPU peer (default /usr/bin/python3, Debian's torch)
#   SIZES        GPU sizes, comma-separated (default gpt2,gpt2-large)
#   MODEL        CPU model folder (default $CURLORA_DATA_DIR/gpt2-mini-wiki, data dir ../shared/data)
#   PAIR_ROUNDS  GPU: rounds of bench/step_pairs.py for the last size in bf16, ours and the peer
#                alternating, whose medians make the headline ratio (default 5; 0 skips them)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
BUILD=${BUILD:-build}
PEER_DIR=${PEER_DIR:-../shared/bench}
bench="$BUILD/bench/bench_step"
[[ -x $bench ]] || { echo "run_step_bench: $bench not found; build it first (ninja -C $BUILD bench/bench_step)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ours="$work/ours.jsonl" peer="$work/peer.jsonl"

case $mode in
  gpu)
    SIZES=${SIZES:-gpt2,gpt2-large}
    for size in ${SIZES//,/ }; do
      "$bench" --device cuda --model "$size" --eval | tee -a "$ours"
      "$bench" --device cuda --model "$size" --eval --tf32 | tee -a "$ours"
      "$bench" --device cuda --model "$size" --eval --bf16 | tee -a "$ours"
    done
    # The peer times every adapter and precision; the table reads its curlora-factored rows.
    "${PEER_PYTHON:-python3}" "$PEER_DIR/torch_reference.py" "$SIZES" | grep '^{' | tee "$peer"
    # The peer reports no memory: its own step again, under torch's peak counter.
    "${PEER_PYTHON:-python3}" bench/torch_peak_memory.py "$SIZES" "$PEER_DIR" | grep '^{' | tee "$work/peer_mem.jsonl"
    if (( ${PAIR_ROUNDS:-5} > 0 )); then
      "${PEER_PYTHON:-python3}" bench/step_pairs.py --size "${SIZES##*,}" --rounds "${PAIR_ROUNDS:-5}" \
        --bench "$bench" --peer-dir "$PEER_DIR" | tee "$work/pairs.jsonl"
    fi
    ;;
  cpu)
    MODEL=${MODEL:-${CURLORA_DATA_DIR:-../shared/data}/gpt2-mini-wiki}
    shape=(--batch 8 --seq 128 --threads 2 --steps 10)
    # --warmup 2: the CPU peer warms up twice.
    "$bench" --device cpu --model "$MODEL" "${shape[@]}" --warmup 2 | tee "$ours"
    "${CPU_PYTHON:-/usr/bin/python3}" "$PEER_DIR/torch_cpu_reference.py" "$MODEL" "${shape[@]}" | grep '^{' | tee "$peer"
    ;;
  *)
    echo "usage: bench/run_step_bench.sh gpu|cpu" >&2
    exit 2
    ;;
esac

python3 - "$mode" "$ours" "$peer" "$work/peer_mem.jsonl" "$work/pairs.jsonl" <<'EOF'
import json, os, sys

mode, ours_path, peer_path, mem_path, pairs_path = sys.argv[1:]
def json_lines(path):
    return [json.loads(l) for l in open(path) if l.startswith("{")] if os.path.exists(path) else []
peer_mem = json_lines(mem_path)
ours = [json.loads(l) for l in open(ours_path) if l.startswith("{")]
peer = [json.loads(l) for l in open(peer_path) if l.startswith("{")]

def row(case, ours_s, torch_s, tokens):
    print(f"{case:<40} {ours_s:>9.4f} {torch_s:>9.4f} {tokens / ours_s:>10.0f} {tokens / torch_s:>10.0f} {torch_s / ours_s:>8.2f}")

print()
print(f"{'case':<40} {'ours s':>9} {'torch s':>9} {'ours tok/s':>10} {'torch tok/s':>10} {'ours/torch':>8}")
if mode == "cpu":
    o, p = ours[0], peer[0]  # the CPU peer reports the median step
    row(f"{o['size']} b{o['batch']}xt{o['seq']} {o['threads']}thr (median)",
        o["train_step_s_median"], p["step_s_median"], o["batch"] * o["seq"])
    print(f"({p['peer']}; ours mean {o['train_step_s']:.4f} s)")
    sys.exit(0)

def peer_row(size, amp, tf32):
    for p in peer:
        if (p["size"], p["adapter"], p["amp_bf16"], p["tf32"]) == (size, "curlora-factored", amp, tf32):
            return p
    sys.exit(f"run_step_bench: no peer row for {size} curlora-factored amp={amp} tf32={tf32}")

eval_key = "eval_b8_t1024_s"
for size in dict.fromkeys(o["size"] for o in ours):
    bf16 = peer_row(size, True, False)
    def precision(o):
        return "bf16" if o["dtype"] == "bf16-mixed" else "tf32" if o["tf32"] else "fp32"
    for o in (o for o in ours if o["size"] == size):
        prec = precision(o)
        train_tokens, eval_tokens = o["batch"] * o["seq"], 8 * 1024
        if prec != "bf16":
            same = peer_row(size, False, o["tf32"])
            row(f"{size} train {prec}", o["train_step_s"], same["train_step_s"], train_tokens)
            row(f"{size} eval {prec}", o[eval_key], same[eval_key], eval_tokens)
        row(f"{size} train {prec} vs torch bf16", o["train_step_s"], bf16["train_step_s"], train_tokens)
        row(f"{size} eval {prec} vs torch bf16", o[eval_key], bf16[eval_key], eval_tokens)
    for o in (o for o in ours if o["size"] == size):
        amp, tf32 = precision(o) == "bf16", precision(o) == "tf32"
        mem = [m for m in peer_mem if (m["size"], m["amp_bf16"], m["tf32"]) == (size, amp, tf32)]
        peak = f", torch train peak {mem[0]['peak_bytes'] / 2**30:.2f} GiB" if mem else ""
        print(f"  ours {size} {precision(o)}: trainable {o['trainable']} (torch "
              f"{bf16['trainable']}), train peak {o['peak_bytes'] / 2**30:.2f} GiB, eval peak "
              f"{o['eval_peak_bytes'] / 2**30:.2f} GiB, median step {o['train_step_s_median']:.4f} s{peak}")
for p in (p for p in json_lines(pairs_path) if "ratio_of_medians" in p):
    print(f"\n{p['size']} train {p['precision']}, {p['rounds']} alternating rounds: medians ours "
          f"{p['ours_median_s']:.4f} s, torch {p['torch_median_s']:.4f} s, ratio {p['ratio_of_medians']:.3f} "
          f"(rounds {p['ratio_min']:.3f} to {p['ratio_max']:.3f})")
EOF
