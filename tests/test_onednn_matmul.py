"""``kernels.onednn_matmul``: bf16 products with float32 results by oneDNN, split over XLA's thread pool, and the
bf16 dense layers and models whose products ``modules.dot`` lowers to it.

``dot.matrix_product_layout`` reads each two-matrix einsum right, swaps included, and the primitive's CPU lowering
computes each; a dense layer's value and gradients stay within bf16 rounding of XLA's, by three kernel calls and no
transposes; ``TRANSFORMER_JAX_ONEDNN``, the CPU's flags, the dtypes and the number of rows choose the path. Every
layout of the kernel itself, and a bf16 GPT's training step on it: tests/test_row_block_product.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import onednn_matmul
from transformer_jax.modules import dot

pytestmark = pytest.mark.skipif(
  not (onednn_matmul.available() and onednn_matmul.cpu_supports(forced=True)),
  reason='the onednn-cpu-gomp package, a C++ compiler or an AVX-512 CPU is missing',
)

BF16 = jnp.bfloat16


@pytest.fixture(autouse=True)
def onednn_for_any_rows(monkeypatch):
  """The kernel on any AVX-512 CPU (by default only where it has AVX512-BF16), for products of any number of rows
  (by default at least ``MIN_ROWS``)."""
  monkeypatch.setenv('TRANSFORMER_JAX_ONEDNN', '1')
  monkeypatch.setattr(onednn_matmul, 'MIN_ROWS', 1)


def normal(seed, shape, dtype=BF16):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def as64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize(
  'spec, layout',
  [
    ('mk,kn->mn', (False, False, False)),  # a dense layer
    ('mk,nk->mn', (False, False, True)),  # a tied head
    ('mn,kn->mk', (False, False, True)),  # the input's gradient of a dense layer
    ('mp,mq->pq', (False, True, False)),  # a weight gradient, x^T g
    ('kn,mk->mn', (True, False, False)),
    ('mk,kn->nm', (True, True, True)),
    ('bmk,kn->bmn', None),  # batched
    ('mk,kn->mkn', None),  # no contraction in the result's terms
    ('mk,mk->mk', None),  # elementwise
    ('mm,mk->mk', None),
  ],
  ids=['dense', 'tied', 'input_grad', 'weight_grad', 'swapped', 'swapped_transposed', 'batched', 'outer',
       'elementwise', 'repeated_index'],
)  # fmt: skip
def test_matrix_product_layout(spec, layout):
  assert dot.matrix_product_layout(spec) == layout


@pytest.mark.parametrize(
  'spec', ['mk,kn->mn', 'mk,nk->mn', 'km,kn->mn', 'kn,mk->mn', 'mk,kn->nm', 'km,nk->nm']
)
def test_cpu_product_of_every_layout_equals_float64(spec):
  """``dot.product_p`` lowered by oneDNN, swaps and transposes included (m 9, k 7, n 5): the kernel is called, and
  the result is the einsum of the same values in float64."""
  sizes = {'m': 9, 'k': 7, 'n': 5}
  (sa, sb), out = spec.split('->')[0].split(','), spec.split('->')[1]
  a, b = normal(2, [sizes[c] for c in sa]), normal(3, [sizes[c] for c in sb])
  product = jax.jit(lambda a, b: dot.product_p.bind(a, b, spec=spec))
  assert onednn_matmul.TARGET in product.lower(a, b).as_text()
  got = product(a, b)
  assert got.shape == tuple(sizes[c] for c in out) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.einsum(spec, as64(a), as64(b)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('transposed', [False, True], ids=['kernel_KN', 'table_NK'])
def test_bf16_dense_layer_equals_xla_to_bf16_rounding(monkeypatch, transposed):
  """A bf16 dense layer's product (batch 2, 5 tokens, 7 features in, 3 out) plus bias through
  :func:`dot.dense_product`: value and the gradients of input, weights and bias within a bf16 step of XLA's, and its
  three products (forward, input and weight gradients) the kernel's, no transpose among them."""
  x, w, bias = normal(4, (2, 5, 7)), normal(5, (3, 7) if transposed else (7, 3)), normal(6, (3,))
  dims = (((2,), (1 if transposed else 0,)), ((), ()))

  def loss(x, w, bias):
    return jnp.sum(jnp.sin(dot.dense_product(x, w, bias, dims).astype(jnp.float32)))

  ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  text = ours.lower(x, w, bias).as_text()
  assert text.count(onednn_matmul.TARGET) == 3
  assert 'transformer_jax_transpose' not in text
  got = ours(x, w, bias)
  monkeypatch.setenv('TRANSFORMER_JAX_ONEDNN', '0')
  reference = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  assert onednn_matmul.TARGET not in reference.lower(x, w, bias).as_text(), 'the reference is XLA'
  want = reference(x, w, bias)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(as64(a), as64(b), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize(
  'setting, flags, dtype, rows, applies',
  [
    ('auto', {'avx512bw', 'avx512_bf16'}, BF16, 256, True),
    ('auto', {'avx512bw'}, BF16, 256, False),  # no AVX512-BF16: XLA's products by default
    ('1', {'avx512bw'}, BF16, 256, True),
    ('1', {'avx2'}, BF16, 256, False),  # oneDNN has no bf16 product below AVX-512
    ('0', {'avx512bw', 'avx512_bf16'}, BF16, 256, False),
    ('auto', {'avx512bw', 'avx512_bf16'}, jnp.float32, 256, False),
    ('auto', {'avx512bw', 'avx512_bf16'}, BF16, 255, False),  # a short prompt stays XLA's
  ],
  ids=['auto_bf16_cpu', 'auto_avx512_only', 'forced_on', 'forced_on_avx2', 'switched_off', 'float32',
       'few_rows'],
)  # fmt: skip
def test_setting_cpu_and_rows_choose_the_path(monkeypatch, setting, flags, dtype, rows, applies):
  monkeypatch.setenv('TRANSFORMER_JAX_ONEDNN', setting)
  monkeypatch.setattr(onednn_matmul.cpu_build, 'cpu_flags', lambda: flags)
  monkeypatch.setattr(onednn_matmul, 'MIN_ROWS', 256)
  assert onednn_matmul.applies(dtype, dtype, rows) is applies
