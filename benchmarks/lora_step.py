"""A LoRA fine-tuning step of a Llama-3.2-1B-shaped model: ours against ``peft`` on PyTorch, and full fine-tuning.

    python -m benchmarks.lora_step [--dir CHECKPOINT] [--layers 16] [--batch 1] [--seq 128] [--rank 16] [--steps 3]

The checkpoint is :mod:`benchmarks.llama_1b`'s (random init, bfloat16 shards; ``--dir`` keeps and reuses it), loaded
in float32 on both sides. Adapters of rank ``--rank`` (alpha twice the rank) on every projection of attention and the
FFN (ours: ``query|key|value|out|fc_gate|fc_in|fc_out``; PEFT: ``q_proj ... down_proj``), AdamW over the adapters
only, next-token loss on a random ``(--batch, --seq)`` batch. Each side runs in a fresh interpreter; ``step_s`` is the
median of ``--steps`` steps after a first (compiling) one, ``tokens_s`` the batch's tokens over it, ``peak_MB`` the
peak resident set during the steps over the resident set before loading (weights included).

Full fine-tuning of the same model is not run (its float32 AdamW state alone is three copies of the weights):
``full (planned)`` is what XLA's plan for our compiled full step says it needs (``memory_analysis``: arguments,
outputs and temporaries, less donated buffers), for params, gradients and both moments; ``torch full`` is the
weights, gradients and moments that torch would hold, 16 bytes per parameter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import machine_info, print_machine, print_table, write_json
from benchmarks.llama_1b import ROOT, _reset_peak, _status_mb, checkpoint_info, save_model

OURS = 'query|key|value|out|fc_gate|fc_in|fc_out'
THEIRS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def _batch(args, vocab: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq + 1))


def _timed(step, sync, steps: int) -> tuple[float, float]:
  start = time.perf_counter()
  sync(step())
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def ours(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from transformer_jax import lora
  from transformer_jax.convert import load_hf

  jax.block_until_ready(jax.device_put(np.zeros(1)))
  base = _reset_peak()
  model, params = load_hf(args.dir, dtype='float32')
  ids = _batch(args, model.config.vocab_size)
  inputs, labels = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
  settings = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=OURS)
  adapters = lora.init(model, params, settings, jax.random.key(0), inputs[:, :1])
  optimizer = optax.adamw(1e-4)

  def loss(a, p):
    logits = lora.apply(model, p, a, settings, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(a, state, p):
    value, grads = jax.value_and_grad(loss)(a, p)
    updates, state = optimizer.update(grads, state, a)
    return optax.apply_updates(a, updates), state, value

  carry = [adapters, optimizer.init(adapters)]

  def run():
    carry[0], carry[1], value = step(carry[0], carry[1], params)
    return value

  first, seconds = _timed(run, jax.block_until_ready, args.steps)
  row = dict(
    first_step_s=first,
    step_s=seconds,
    peak_MB=_status_mb('VmHWM') - base,
    trainable=lora.count(adapters),
    params=int(sum(x.size for x in jax.tree.leaves(params))),
  )
  row['full_planned_MB'] = _planned_full_step(model, params, inputs, labels)
  return row


def _planned_full_step(model, params, inputs, labels) -> float:
  """What XLA plans to hold for one full fine-tuning step (params, grads, AdamW moments, activations), compiled on
  shapes alone: nothing of it is allocated."""
  import jax
  import optax

  optimizer = optax.adamw(1e-4)

  def step(p, state):
    def loss(p):
      logits = model.apply({'params': p}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss)(p)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  shapes = jax.eval_shape(lambda p: (p, optimizer.init(p)), params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*shapes).compile()
  memory = compiled.memory_analysis()
  total = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    + memory.temp_size_in_bytes
    - memory.alias_size_in_bytes
  )
  return total / 1e6


def theirs(args) -> dict:
  import peft
  import torch
  import transformers

  torch.set_num_threads(torch.get_num_threads())
  base = _reset_peak()
  model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
  config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=THEIRS)
  model = peft.get_peft_model(model, config)
  model.train()
  ids = torch.tensor(_batch(args, model.config.vocab_size))
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

  def run():
    optimizer.zero_grad()
    out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    # transformers shifts labels itself; the loss covers the same next-token pairs as ours but the last
    out.loss.backward()
    optimizer.step()
    return out.loss

  first, seconds = _timed(run, lambda loss: loss.item(), args.steps)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return dict(
    first_step_s=first,
    step_s=seconds,
    peak_MB=_status_mb('VmHWM') - base,
    trainable=trainable,
    params=sum(p.numel() for p in model.parameters()) - trainable,
  )


def _spawn(side: str, args) -> dict:
  with tempfile.NamedTemporaryFile(suffix='.json') as result:
    command = [
      sys.executable,
      '-m',
      'benchmarks.lora_step',
      '--side',
      side,
      '--result',
      result.name,
    ]
    command += ['--dir', str(args.dir), '--batch', str(args.batch), '--seq', str(args.seq)]
    command += ['--rank', str(args.rank), '--steps', str(args.steps)]
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(Path(result.name).read_text())


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m benchmarks.lora_step', description=__doc__)
  parser.add_argument('--dir', type=Path, help='where the checkpoint is kept (default: a temp dir)')
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--out', default='benchmarks/results/lora_step.json')
  parser.add_argument('--side', choices=['ours', 'theirs'], help=argparse.SUPPRESS)
  parser.add_argument('--result', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.side:
    row = ours(args) if args.side == 'ours' else theirs(args)
    Path(args.result).write_text(json.dumps(row))
    return
  with tempfile.TemporaryDirectory() as scratch:
    args.dir = args.dir or Path(scratch) / 'llama'
    if not (args.dir / 'model.safetensors.index.json').is_file():
      save_model(args.dir, args.layers)
    info = checkpoint_info(args.dir)
    machine = machine_info()
    print_machine(machine)
    mine, peft_side = _spawn('ours', args), _spawn('theirs', args)
  tokens = args.batch * args.seq
  weights_mb = mine['params'] * 4 / 1e6
  planned = mine.pop('full_planned_MB')
  rows = [
    dict(impl='jax + lora', **mine),
    dict(impl='torch + peft', **peft_side),
    dict(impl='full (planned)', peak_MB=planned, params=mine['params']),
    dict(impl='torch full', peak_MB=16 * mine['params'] / 1e6, params=mine['params']),
  ]
  for row in rows:
    if 'step_s' in row:
      row['tokens_s'] = tokens / row['step_s']
      row['vs_peft'] = peft_side['step_s'] / row['step_s']
    row['peak_x_weights'] = row['peak_MB'] / weights_mb
  print(f'checkpoint: {info}; weights {weights_mb:,.0f} MB in float32; {tokens} tokens per step')
  columns = ['impl', 'params', 'trainable', 'first_step_s', 'step_s', 'tokens_s', 'vs_peft']
  print_table(rows, columns + ['peak_MB', 'peak_x_weights'])
  write_json(args.out, 'lora_step', machine, vars(args) | {'dir': str(args.dir)}, rows)


if __name__ == '__main__':
  main()
