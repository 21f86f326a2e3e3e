"""``kernels.mkl_matmul``: float32 products by MKL, split over XLA's thread pool, and the dense layers that use them.

A dense layer's product, its gradients (reverse, forward, second order) and vmap equal XLA's;
``TRANSFORMER_JAX_MKL``, the CPU's vendor and the number of rows choose the path. Every layout against float64, and a
GPT's training step on the kernel: tests/test_row_block_product.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import mkl_matmul
from transformer_jax.modules import dot

pytestmark = pytest.mark.skipif(
  not mkl_matmul.available(), reason='the mkl package or a C++ compiler is missing'
)

F32 = jnp.float32


@pytest.fixture(autouse=True)
def mkl_on_any_cpu(monkeypatch):
  """The kernel on whatever x86 CPU runs the tests (by default it is chosen on Intel CPUs only), for products of
  any number of rows (by default at least ``MIN_ROWS``)."""
  monkeypatch.setenv('TRANSFORMER_JAX_MKL', '1')
  monkeypatch.setattr(mkl_matmul, 'MIN_ROWS', 1)


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, F32)


@pytest.mark.parametrize('transposed', [False, True], ids=['kernel_KN', 'table_NK'])
def test_dense_product_value_and_gradients_equal_xla(transposed):
  """A dense layer's product (batch 2, 5 tokens, 7 features in, 3 out) plus bias through :func:`dot.dense_product`
  against ``lax.dot_general``: value and the gradients of input, weights and bias."""
  x, w, bias = normal(2, (2, 5, 7)), normal(3, (3, 7) if transposed else (7, 3)), normal(4, (3,))
  dims = (((2,), (1 if transposed else 0,)), ((), ()))

  def loss(product):
    return lambda x, w, bias: jnp.sum(jnp.sin(product(x, w, bias)))

  ours = loss(lambda x, w, bias: dot.dense_product(x, w, bias, dims))
  plain = loss(lambda x, w, bias: jax.lax.dot_general(x, w, dims) + bias)
  with jax.default_matmul_precision('highest'):
    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, w, bias)
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, w, bias)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert 'transformer_jax_mkl_matmul' in jax.jit(jax.grad(ours)).lower(x, w, bias).as_text()


@pytest.mark.parametrize(
  'a_axis, b_axis, transpose_a',
  [(0, None, False), (1, None, False), (0, None, True), (0, 0, False), (None, 2, False)],
  ids=['a_stacked', 'a_axis1', 'a_transposed', 'both', 'b_only'],
)
def test_vmap_equals_einsum(a_axis, b_axis, transpose_a):
  """vmap over ``a`` (4 examples of (6, 7), or (7, 6) transposed), ``b`` (7, 3), or both, on any axis."""
  a = normal(5, (4, 7, 6) if transpose_a else (4, 6, 7))
  b = normal(6, (4, 7, 3))
  a_in = a if a_axis is not None else a[0]
  a_in = jnp.moveaxis(a_in, 0, a_axis) if a_axis else a_in
  b_in = b if b_axis is not None else b[0]
  b_in = jnp.moveaxis(b_in, 0, b_axis) if b_axis else b_in
  mapped = jax.vmap(lambda x, y: mkl_matmul.product(x, y, transpose_a, False), (a_axis, b_axis))
  got = jax.jit(mapped)(a_in, b_in)
  a_all = a if a_axis is not None else jnp.broadcast_to(a[0], a.shape)
  b_all = b if b_axis is not None else jnp.broadcast_to(b[0], b.shape)
  want = np.einsum('ekm,ekn->emn' if transpose_a else 'emk,ekn->emn', a_all, b_all)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_forward_mode_and_second_order_equal_xla():
  """jvp, jacfwd and the Hessian of a tied-head-like product (``x w^T``, x (3, 5), w (4, 5)) equal XLA's."""
  x, w = normal(9, (3, 5)), normal(10, (4, 5))

  def loss(product):
    return lambda x, w: jnp.sum(jnp.tanh(product(x, w)) ** 2)

  ours = loss(lambda x, w: mkl_matmul.matmul(x, w, True))
  plain = loss(lambda x, w: x @ w.T)
  tangents = (normal(11, x.shape), normal(12, w.shape))
  with jax.default_matmul_precision('highest'):
    pairs = [
      (jax.jvp(ours, (x, w), tangents), jax.jvp(plain, (x, w), tangents)),
      (jax.jacfwd(ours, (0, 1))(x, w), jax.jacfwd(plain, (0, 1))(x, w)),
      (jax.hessian(ours)(x, w), jax.hessian(plain)(x, w)),
    ]
  for got, want in pairs:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'setting, intel, dtype, rows, applies',
  [
    ('auto', True, F32, 512, True),
    ('auto', False, F32, 512, False),  # AMD: XLA's float32 products are level with MKL's or ahead
    ('1', False, F32, 512, True),
    ('0', True, F32, 512, False),
    ('auto', True, jnp.bfloat16, 512, False),
    ('1', True, F32, 511, False),  # a decoding step's few rows stay XLA's
  ],
  ids=['auto_intel', 'auto_other_vendor', 'forced_on', 'switched_off', 'bf16', 'few_rows'],
)
def test_setting_vendor_and_rows_choose_the_path(monkeypatch, setting, intel, dtype, rows, applies):
  monkeypatch.setenv('TRANSFORMER_JAX_MKL', setting)
  monkeypatch.setattr(mkl_matmul, 'intel_cpu', lambda: intel)
  monkeypatch.setattr(mkl_matmul, 'MIN_ROWS', 512)
  assert mkl_matmul.applies(dtype, dtype, dtype, rows) is applies
