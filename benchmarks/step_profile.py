"""Where a compiled training step spends its time on this machine: XLA's ops, profiled, summed by kind and by op.

    python -m benchmarks.step_profile [--model gpt|seq2seq|bert] [--precision float32|bfloat16] [--steps 3]
        [--top 20] [--override attention_implementation=einsum] (and train_throughput's shape flags)

It compiles the same AdamW step that ``python -m benchmarks.train_throughput`` times (ours, Linen), runs it under
``jax.profiler.trace`` and reads the trace's XLA ops back: each op's time, and for each product (a dot, alone or
fused with elementwise work) its FLOPs from the compiled HLO, so its achieved GFLOP/s shows against the matmul peak
printed beside it. Two tables: op time per step by kind (products, our CPU kernels by name, copies and transposes,
reductions, other elementwise fusions), and the ``--top`` ops with the model path they come from. Op time can
exceed the wall time: XLA:CPU runs independent ops side by side, each then slower. So each op also gets its share of
the wall (``wall ms``: every instant split evenly between the ops running in it), which adds up to the step's busy
time, and its products their GFLOP/s by that share (``by wall``); both tables are sorted by it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import re
import tempfile
import time

import jax

from benchmarks.harness import (
  keep_host_memory,
  machine_info,
  peak_flops,
  print_machine,
  print_table,
)
from benchmarks.train_cases import CASES, add_shape_arguments, parse_overrides
from benchmarks.train_throughput import compiled_jax_step
from transformer_jax.kernels import mkl_matmul, onednn_matmul

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\w+\[[^\]]*\])\S* (\S+)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) .*\{$')
_DIMS = re.compile(r'\w+\[([\d,]*)\]')


CONTROL_FLOW = ('while', 'conditional', 'call')
# the kernels whose custom call is one matrix product by a library (their FLOPs are counted like a dot's)
LIBRARY_PRODUCTS = {mkl_matmul.TARGET: 'MKL', onednn_matmul.TARGET: 'oneDNN'}


@dataclasses.dataclass
class Op:
  """One HLO instruction of the compiled program: its opcode, the computation it calls, its own FLOPs."""

  opcode: str
  calls: str | None
  flops: int
  target: str | None  # a custom call's target
  path: str  # the model path of the JAX op it came from


def dims(shape: str) -> list[int]:
  match = _DIMS.match(shape)
  return [int(d) for d in match.group(1).split(',') if d] if match else []


@dataclasses.dataclass
class Program:
  """A compiled program's instructions by name, each computation's instruction names, and the entry's name."""

  ops: dict[str, Op]
  members: dict[str, list[str]]
  entry: str

  def flops(self, name: str) -> int:
    """An instruction's FLOPs with those of the fused computation it calls."""
    op = self.ops[name]
    inner = self.members.get(op.calls, []) if op.opcode == 'fusion' else []
    return op.flops + sum(self.flops(m) for m in inner)


def parse_hlo(text: str) -> Program:
  """The instructions of compiled HLO text, the FLOPs of each dot and library product (2 x result elements x
  contracted size) counted."""
  ops, members, shapes, computation, entry = {}, collections.defaultdict(list), {}, None, None
  for line in text.splitlines():
    if (start := _COMPUTATION.match(line)) and ' = ' not in line.split('{')[0]:
      computation = start.group(1)
      entry = computation if line.startswith('ENTRY') else entry
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    shapes[name] = shape
    calls = re.search(r'calls=%([\w.\-]+)', rest)
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    flops = 0
    if opcode == 'dot' or (target and target.group(1) in LIBRARY_PRODUCTS):
      lhs_dims = dims(shapes[rest.split(',')[0].strip().lstrip('%')])
      if opcode == 'dot':
        contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest).group(1)
        depth = math.prod(lhs_dims[int(i)] for i in contracting.split(',') if i)
      else:  # op(a) op(b) of two matrices: K is a's second dimension, or its first when read transposed
        depth = lhs_dims[0 if 'transpose_a = true' in rest else 1]
      flops = 2 * math.prod(dims(shape)) * depth
    path = re.search(r'op_name="([^"]+)"', rest)
    ops[name] = Op(
      opcode,
      calls.group(1) if calls else None,
      flops,
      target.group(1) if target else None,
      path.group(1) if path else '',
    )
    members[computation].append(name)
  return Program(ops, dict(members), entry)


def kind_of(name: str, op: Op, flops: int) -> str:
  if op.target in LIBRARY_PRODUCTS:
    return f'products by {LIBRARY_PRODUCTS[op.target]}'
  if flops:
    return 'products (dots, with what XLA fused into them)'
  if op.opcode == 'custom-call':
    return f'kernel {op.target}'
  if op.opcode in ('copy', 'transpose') or name.startswith(('copy', 'transpose')):
    return 'copies and transposes'
  if 'reduce' in name:
    return 'reductions'
  return 'other elementwise and data movement'


def short_path(path: str) -> str:
  """``jit(step)/transpose(jvp(GPT))/GPT.hidden_states/decoder/layers_5/...`` -> ``grad .../layers_5/...``."""
  direction = 'grad ' if 'transpose(' in path else ''
  path = re.sub(r'^jit\(\w+\)/', '', path)
  path = re.sub(r'(transpose|jvp)\(|\)', '', path)
  return direction + '/'.join(p for p in path.split('/') if '.' not in p)[-70:]


def trace_events(step, steps: int) -> list[dict]:
  """The XLA op events (those that name an ``hlo_op``) of ``steps`` calls of ``step`` under the profiler."""
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(steps):
        step()
    (path,) = glob.glob(f'{log_dir}/**/perfetto_trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)['traceEvents']
  return [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]


def wall_shares(events: list[dict]) -> dict[str, float]:
  """Each op's share of the wall, in the events' microseconds: every instant split evenly between the ops running
  then. Op time counts an instant once per op running in it, so two ops side by side each look twice as slow; their
  wall shares add up to the time that some op ran."""
  edges = sorted(
    [(e['ts'], 1, i) for i, e in enumerate(events)]
    + [(e['ts'] + e['dur'], -1, i) for i, e in enumerate(events)]
  )
  shares = collections.defaultdict(float)
  running: set[int] = set()
  last = None
  for at, change, index in edges:
    if running and at > last:
      for i in running:
        shares[events[i]['args']['hlo_op']] += (at - last) / len(running)
    last = at
    if change > 0:
      running.add(index)
    else:
      running.discard(index)
  return dict(shares)


def counted(program: Program, name: str) -> bool:
  """An event's op is counted: an instruction of the program (not a thunk of XLA's own), and not control flow, whose
  time is its body's ops'."""
  op = program.ops.get(name)
  return op is not None and op.opcode not in CONTROL_FLOW


def op_times(program: Program, events: list[dict], steps: int) -> tuple[list[dict], dict]:
  """``(rows, by_kind)`` from the trace ``events`` of ``steps`` calls: a row per op (its ms per step, the GFLOP/s of
  its products by op time and by wall share, its kind and model path), and per kind ``[ms, ops, FLOPs, wall ms]``
  per step. An op in a loop body (``scan_layers``) runs several times a step: its time and FLOPs count every run.
  Only :func:`counted` ops make rows and share the wall (a loop's own event spans its body's)."""
  per_op = collections.defaultdict(float)
  runs = collections.Counter()
  for event in events:
    per_op[event['args']['hlo_op']] += event['dur'] / 1e3 / steps
    runs[event['args']['hlo_op']] += 1
  wall = wall_shares([e for e in events if counted(program, e['args']['hlo_op'])])
  by_kind = collections.defaultdict(lambda: [0.0, 0, 0, 0.0])
  rows = []
  for name, ms in per_op.items():
    if not counted(program, name):
      continue
    op = program.ops[name]
    flops = program.flops(name) * runs[name] // steps
    kind = kind_of(name, op, flops)
    wall_ms = wall.get(name, 0.0) / 1e3 / steps
    by_kind[kind][0] += ms
    by_kind[kind][1] += 1
    by_kind[kind][2] += flops
    by_kind[kind][3] += wall_ms
    rows.append(
      {
        'op': name,
        'ms': ms,
        'wall ms': wall_ms,
        'GFLOP/s': flops / ms / 1e6 if flops else '',
        'by wall': flops / wall_ms / 1e6 if flops and wall_ms else '',
        'kind': kind.split(' (')[0],
        'from': short_path(op.path),
      }
    )
  return rows, dict(by_kind)


def main():
  keep_host_memory()
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--model', choices=sorted(CASES), default='gpt')
  parser.add_argument('--precision', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument('--steps', type=int, default=3, help='profiled steps (op times are per step)')
  parser.add_argument('--top', type=int, default=20, help='the slowest ops listed')
  add_shape_arguments(parser)
  args = parser.parse_args()

  print_machine(machine_info())
  peak, peak_source = peak_flops()
  print(f'peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})', flush=True)
  case = CASES[args.model](args, {'dtype': args.precision, **parse_overrides(args.override)})
  compiled, state, batch, rng, _ = compiled_jax_step(case)
  program = parse_hlo(compiled.as_text())

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], batch, rng)
    jax.block_until_ready(loss)

  for _ in range(2):
    step()
  start = time.perf_counter()
  step()
  wall_ms = 1e3 * (time.perf_counter() - start)
  events = trace_events(step, args.steps)

  rows, by_kind = op_times(program, events, args.steps)
  op_ms = sum(kind[0] for kind in by_kind.values())
  busy_ms = sum(kind[3] for kind in by_kind.values())
  print(
    f'\n{args.model} {args.precision}: one step {wall_ms:,.0f} ms wall (unprofiled), '
    f'{op_ms:,.0f} ms of op time (profiled, per step); some op ran for {busy_ms:,.0f} ms of the wall, '
    'split between the ops running at each instant (wall ms)\n'
  )
  kinds = [
    {
      'kind': kind,
      'ops': count,
      'ms': ms,
      '% of op time': 100 * ms / op_ms,
      'wall ms': wall_ms,
      'GFLOP/s': flops / ms / 1e6 if flops else '',
      'by wall': flops / wall_ms / 1e6 if flops and wall_ms else '',
    }
    for kind, (ms, count, flops, wall_ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][3])
  ]
  print_table(kinds, ['kind', 'ops', 'ms', '% of op time', 'wall ms', 'GFLOP/s', 'by wall'])
  print()
  rows.sort(key=lambda r: -r['wall ms'])
  print_table(
    [{**r, 'op': r['op'][:28]} for r in rows[: args.top]],
    ['op', 'ms', 'wall ms', 'GFLOP/s', 'by wall', 'kind', 'from'],
  )


if __name__ == '__main__':
  main()
