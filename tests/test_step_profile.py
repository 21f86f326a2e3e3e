"""``benchmarks.step_profile``: the FLOPs it reads from compiled HLO, and the profiled ops it matches to them."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from test_row_block_product import KERNELS

from benchmarks.step_profile import (
  kind_of,
  op_times,
  parse_hlo,
  short_path,
  trace_events,
  wall_shares,
)

B, M, K, N = 2, 5, 7, 3


def _compiled(fn, *shapes):
  args = [jnp.ones(s, jnp.float32) for s in shapes]
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, args, parse_hlo(compiled.as_text())


def _entry_flops(program):
  """FLOPs by instruction of the entry computation: the ops that run, each dot inside exactly one of them."""
  return {n: program.flops(n) for n in program.members[program.entry]}


@pytest.mark.parametrize(
  'name, fn, shapes, expected',
  [
    ('x w', lambda x, w: x @ w, [(M, K), (K, N)], 2 * M * K * N),
    (
      'x^T g',
      lambda x, g: lax.dot_general(x, g, (((0,), (0,)), ((), ()))),
      [(K, M), (K, N)],
      2 * M * K * N,
    ),
    (
      'g w^T',
      lambda g, w: lax.dot_general(g, w, (((1,), (1,)), ((), ()))),
      [(M, K), (N, K)],
      2 * M * K * N,
    ),
    (
      'batched',
      lambda a, b: jnp.einsum('bmk,bkn->bmn', a, b),
      [(B, M, K), (B, K, N)],
      2 * B * M * K * N,
    ),
    ('fused with tanh', lambda x, w: jnp.tanh(x @ w) + 1.0, [(M, K), (K, N)], 2 * M * K * N),
  ],
)
def test_product_flops(name, fn, shapes, expected):
  _, _, program = _compiled(fn, *shapes)
  flops = _entry_flops(program)
  assert sum(flops.values()) == expected, (name, flops)


def test_two_products_and_the_kinds_of_ops():
  def fn(x, w1, w2):
    return jnp.sum(jnp.tanh(x @ w1) @ w2, axis=0)

  _, _, program = _compiled(fn, (M, K), (K, N), (N, 11))
  flops = _entry_flops(program)
  products = sorted(f for f in flops.values() if f)
  assert products == sorted([2 * M * K * N, 2 * M * N * 11])
  kinds = {kind_of(n, program.ops[n], f) for n, f in flops.items()}
  assert 'products (dots, with what XLA fused into them)' in kinds
  assert kind_of('copy.3', program.ops[next(iter(flops))], 0) == 'copies and transposes'


def test_trace_names_the_compiled_ops():
  compiled, args, program = _compiled(lambda x, w: jnp.tanh(x @ w), (64, 96), (96, 80))
  events = trace_events(lambda: jax.block_until_ready(compiled(*args)), steps=2)
  names = {e['args']['hlo_op'] for e in events}
  assert any(program.flops(n) == 2 * 64 * 96 * 80 for n in names & set(program.ops))


def test_short_path_tells_gradient_ops():
  forward = 'jit(step)/jvp(GPT)/GPT.hidden_states/decoder/layers_0/ffn/fc_in/dot_general'
  backward = (
    'jit(step)/transpose(jvp(GPT))/GPT.hidden_states/decoder/layers_5/ffn/fc_in/dot_general'
  )
  assert short_path(forward) == 'GPT/decoder/layers_0/ffn/fc_in/dot_general'
  assert short_path(backward) == 'grad GPT/decoder/layers_5/ffn/fc_in/dot_general'


def test_an_op_in_a_loop_counts_every_run():
  """A product inside a three-step scan: its FLOPs count three times a call, and the loop itself is not an op."""
  w = jnp.ones((96, 96))

  def fn(x):
    return lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0]

  compiled, args, program = _compiled(fn, (64, 96))
  events = trace_events(lambda: jax.block_until_ready(compiled(*args)), steps=2)
  rows, by_kind = op_times(program, events, steps=2)
  loops = [n for n, op in program.ops.items() if op.opcode == 'while']
  assert loops, 'the scan was unrolled: nothing here runs more than once a call'
  products = by_kind['products (dots, with what XLA fused into them)']
  assert products[2] == 3 * 2 * 64 * 96 * 96
  assert {r['op'] for r in rows}.isdisjoint(loops)
  assert {r['op'] for r in rows} <= set(program.ops)
  # the loop's own event, which spans its body's, takes no share: the rows' shares add up to the time their events
  # cover (with it, each body op's share would be halved)
  spans = sorted(
    (e['ts'], e['ts'] + e['dur']) for e in events if e['args']['hlo_op'] in {r['op'] for r in rows}
  )
  covered, end = 0.0, float('-inf')
  for start, stop in spans:
    covered += max(0.0, stop - max(start, end))
    end = max(end, stop)
  assert sum(r['wall ms'] for r in rows) == pytest.approx(covered / 1e3 / 2)
  assert products[3] > 0


def _event(op, ts, dur):
  return {'ts': ts, 'dur': dur, 'args': {'hlo_op': op}}


@pytest.mark.parametrize(
  'name, events, expected',
  [
    ('one after the other', [_event('a', 0, 10), _event('b', 10, 5)], {'a': 10, 'b': 5}),
    # b runs beside a for 4 of a's 10: those 4 are split in two
    ('overlapping', [_event('a', 0, 10), _event('b', 6, 7)], {'a': 8, 'b': 5}),
    ('a gap counts for none', [_event('a', 0, 3), _event('b', 8, 2)], {'a': 3, 'b': 2}),
    (
      'three at once, twice the same op',
      [_event('a', 0, 6), _event('b', 0, 6), _event('a', 3, 3)],
      {'a': 1.5 + 2 * 1, 'b': 1.5 + 1},
    ),
  ],
)
def test_wall_shares_split_each_instant_between_running_ops(name, events, expected):
  shares = wall_shares(events)
  assert shares == pytest.approx(expected), name
  assert sum(shares.values()) == pytest.approx(
    len({t for e in events for t in range(e['ts'], e['ts'] + e['dur'])})
  )


@pytest.mark.parametrize('name', sorted(KERNELS))
@pytest.mark.parametrize('transpose_a', [False, True], ids=['x_w', 'x_T_g'])
def test_library_product_flops_and_kind(monkeypatch, name, transpose_a):
  """A library product's custom call (m 300, k 7, n 5; MKL's float32, oneDNN's bf16) counts 2 M K N FLOPs, read
  transposed or not, under its library's own kind."""
  kernel = KERNELS[name]
  if not kernel.runs():
    pytest.skip(f'{name}: its package, a C++ compiler or the CPU it needs is missing')
  monkeypatch.setenv(kernel.module.SWITCH, '1')
  a = jnp.ones((K, 300) if transpose_a else (300, K), kernel.dtype)
  b = jnp.ones((K, N), kernel.dtype)
  fn = jax.jit(lambda a, b: kernel.module.product(a, b, transpose_a, False))
  program = parse_hlo(fn.lower(a, b).compile().as_text())
  flops = _entry_flops(program)
  assert sum(flops.values()) == 2 * 300 * K * N
  (call,) = [n for n, f in flops.items() if f]
  library = {'mkl': 'MKL', 'onednn': 'oneDNN'}[name]
  assert kind_of(call, program.ops[call], flops[call]) == f'products by {library}'
