#!/usr/bin/env bash
# The CPU figures behind benchmarks/RESULTS.md's targets in one run of about ten minutes on 2 cores, from the
# repository root of an installed checkout (`pip install -e ".[test]"`; nothing is downloaded):
#
#   bash benchmarks/cpu_check.sh [OUTPUT_DIR]      # default benchmarks/results/cpu
#
# 1. training steps of the GPT, the encoder-decoder and BERT, float32 and bf16, ours against PyTorch eager, its SDPA
#    GPT and torch.compile, timed side by side (the CPU and which library ran the products head the log); where a
#    library runs our products (MKL float32, oneDNN bf16), also ours with XLA's, to show whether it pays on this CPU;
# 2. greedy decoding at batch 1 of GPT-2 small and the small shape, float32 and bf16 weights, against the bandwidth
#    bound;
# 3. python -m benchmarks.targets over both records: one line per target, met or not.
# Run it on a quiet machine: every figure is a ratio within one run, but a busy core still moves them.
set -uo pipefail
out=${1:-benchmarks/results/cpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

status=0
"$python" -m benchmarks.train_throughput --precision float32 bfloat16 --xla-products \
  --out "$out/train_throughput.json" 2>&1 | tee "$out/train_throughput.log" || status=1
"$python" -m benchmarks.decode --batches 1 --out "$out/decode.json" 2>&1 | tee "$out/decode.log" || status=1
"$python" -m benchmarks.targets --train "$out/train_throughput.json" --decode "$out/decode.json" 2>&1 |
  tee "$out/targets.log" || status=1
exit $status
