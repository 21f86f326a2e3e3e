"""The CPU product paths of ``transformer_jax.modules.dot`` against XLA's own, one product at a time.

    python -m benchmarks.cpu_products [--rows 1 2 4 8] [--repeats 20] [--step-dots bfloat16]

Three tables, each from this process on this CPU (fastest of ``--repeats`` calls, ms):
- ``products``: the few-row kernel (``kernels.skinny_matmul``) against ``lax.dot_general`` of the same operands with
  a float32 result, for GPT-2 small's shapes (a ``(K, N)`` Dense kernel and the ``(N, K)`` tied table), float32 and
  bf16 weights, per number of rows.
- ``weight gradients``: the bf16 ``x^T g`` of a dense layer as XLA writes it, behind an ``optimization_barrier``
  transpose, after the transpose kernel (``kernels.transpose``, what ``dot.cpu_matmul``'s gradient does), and from
  an already transposed array.
- ``--step-dots DTYPE``: the dots of the compiled course-GPT training step (the one ``train_throughput`` times),
  their FLOPs by operand and result dtype: how much of a ``dtype='bfloat16'`` step XLA runs as bf16 products.
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.harness import machine_info, print_machine, print_table, time_call
from transformer_jax.kernels import skinny_matmul, transpose

F32 = jnp.float32
SHAPES = [(768, 3072, False), (3072, 768, False), (768, 50257, True)]  # (K, N, table layout)


def fastest_ms(fn, *args, repeats: int) -> float:
  compiled = jax.jit(fn)
  return 1e3 * time_call(lambda: compiled(*args), repeats=repeats, best=True)


def product_rows(rows_list, repeats):
  table = []
  for k, n, transposed in SHAPES:
    for dtype in ('float32', 'bfloat16'):
      w = jax.random.normal(jax.random.key(0), (n, k) if transposed else (k, n), dtype)
      dims = (((1,), (1 if transposed else 0,)), ((), ()))
      row = {
        'K x N': f'{k} x {n}',
        'layout': '(N, K)' if transposed else '(K, N)',
        'weights': dtype,
      }
      for rows in rows_list:
        x = jax.random.normal(jax.random.key(1), (rows, k), F32)
        kernel = fastest_ms(
          lambda x, w, t=transposed: skinny_matmul.matmul(x, w, t), x, w, repeats=repeats
        )
        xla = fastest_ms(
          lambda x, w, d=dims: lax.dot_general(x.astype(w.dtype), w, d, preferred_element_type=F32),
          x,
          w,
          repeats=repeats,
        )
        row[f'{rows} rows kernel / XLA'] = f'{kernel:.3f} / {xla:.3f}'
      table.append(row)
  return table


def weight_gradient_rows(repeats):
  table = []
  rows_first = (((0,), (0,)), ((), ()))
  canonical = (((1,), (0,)), ((), ()))
  for m, k, n in [(2048, 384, 1536), (2048, 1536, 384), (2048, 384, 384)]:
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), (m, n), jnp.bfloat16)
    forms = {
      'XLA x^T g': lambda x, g: lax.dot_general(x, g, rows_first, preferred_element_type=F32),
      'barrier transpose': lambda x, g: lax.dot_general(
        lax.optimization_barrier(x.T), g, canonical, preferred_element_type=F32
      ),
      'kernel transpose': lambda x, g: lax.dot_general(
        transpose.transpose(x), g, canonical, preferred_element_type=F32
      ),
      'transpose alone': lambda x, g: transpose.transpose(x),
    }
    row = {'M x K x N': f'{m} x {k} x {n}'}
    for name, form in forms.items():
      row[name] = fastest_ms(form, x, g, repeats=repeats)
    xt = jnp.asarray(x.T)
    fresh = lambda a, g: lax.dot_general(a, g, canonical, preferred_element_type=F32)  # noqa: E731
    row['already transposed'] = fastest_ms(fresh, xt, g, repeats=repeats)
    table.append(row)
  return table


def step_dot_rows(dtype: str):
  """FLOPs of the compiled GPT step's dots by (operand, operand, result) dtype."""
  from benchmarks import train_cases, train_throughput

  args = argparse.Namespace(gpt_shape='course', seq=256, dropout=0.0, gpt_layers=None, batch=8)
  case = train_cases.CASES['gpt'](args, {'dtype': dtype})
  optimizer, step = train_throughput.linen_step(case)
  params = train_cases.init_params(case)
  hlo = jax.jit(step).lower(params, optimizer.init(params), case.batch, jax.random.key(1))
  flops = collections.Counter()
  for computation in hlo.compile().as_text().split('\n\n'):
    declared = dict(re.findall(r'%(\S+) = (\w+)\[', computation))
    for line in computation.splitlines():
      dot = re.search(r'= (\w+)\[([\d,]*)\]\S* dot\(%(\S+), %(\S+)\)', line)
      if not dot:
        continue
      lhs_shape = re.search(r'%' + re.escape(dot.group(3)) + r' = \w+\[([\d,]*)\]', computation)
      contracted = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line).group(1)
      lhs_dims = [int(d) for d in lhs_shape.group(1).split(',') if d]
      depth = 1
      for d in contracted.split(','):
        depth *= lhs_dims[int(d)] if d else 1
      out = 1
      for d in dot.group(2).split(','):
        out *= int(d) if d else 1
      key = (declared.get(dot.group(3)), declared.get(dot.group(4)), dot.group(1))
      flops[key] += 2 * out * depth
  total = sum(flops.values())
  return [
    {'operands': f'{a} x {b}', 'result': r, 'GFLOP': v / 1e9, 'share %': 100 * v / total}
    for (a, b, r), v in flops.most_common()
  ]


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--rows', type=int, nargs='+', default=[1, 2, 4, 8])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--step-dots', choices=['float32', 'bfloat16'], default=None)
  args = parser.parse_args()
  print_machine(machine_info())
  if not (skinny_matmul.available() and transpose.available()):
    raise SystemExit('the CPU kernels could not be built here (see the logged warning)')
  products = product_rows(args.rows, args.repeats)
  print_table(products, list(products[0]))
  gradients = weight_gradient_rows(args.repeats)
  print()
  print_table(gradients, list(gradients[0]))
  if args.step_dots:
    print()
    print_table(step_dot_rows(args.step_dots), ['operands', 'result', 'GFLOP', 'share %'])


if __name__ == '__main__':
  main()
