#!/usr/bin/env bash
# The GPU figures in one run of about five minutes, from the repository root of a machine whose Python already has
# JAX with CUDA, Flax, Optax, PyTorch with CUDA and transformers (nothing is installed or downloaded here):
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # default benchmarks/results/gpu
#
# 1. the machine: the GPU, the driver, and the versions Python sees (JAX must report a GPU backend, or it stops);
# 2. GPT-2 small training at T=1024 in bf16, ours (cuDNN attention) against GPT2LMHeadModel under autocast, eager and
#    torch.compile, with our MFU against the card's datasheet bf16 peak;
# 3. greedy decoding of GPT-2 small and the small shape at batch 1 and 8, float32 and bf16 weights;
# 4. python -m benchmarks.targets over the training record: the bf16 MFU target, met or not.
# Each part's log and JSON land in OUTPUT_DIR. A part that fails or runs past its time limit does not stop the next.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/machine.log"
"$python" - <<'EOF' 2>&1 | tee -a "$out/machine.log" || exit 1
import sys

import flax
import jax
import optax
import torch
import transformers

print(f'python {sys.version.split()[0]}; jax {jax.__version__} on {jax.default_backend()}: {jax.devices()}')
print(f'flax {flax.__version__}, optax {optax.__version__}, torch {torch.__version__} '
      f'(CUDA: {torch.cuda.is_available()}), transformers {transformers.__version__}')
if jax.default_backend() != 'gpu':
  sys.exit('JAX sees no GPU here: these figures would be CPU figures')
EOF

status=0
timeout 330 "$python" -m benchmarks.train_throughput --models gpt --gpt-shape gpt2-small --seq 1024 \
  --out "$out/train_throughput.json" 2>&1 | tee "$out/train_throughput.log" || status=1
timeout 200 "$python" -m benchmarks.decode --out "$out/decode.json" 2>&1 | tee "$out/decode.log" || status=1
"$python" -m benchmarks.targets --train "$out/train_throughput.json" 2>&1 | tee "$out/targets.log" || status=1
exit $status
