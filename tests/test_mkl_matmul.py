"""``kernels.mkl_matmul``: float32 products by MKL, split over XLA's thread pool, and the dense layers that use them.

Every layout of the product equals a float64 reference; the gradients equal XLA's; ``TRANSFORMER_JAX_MKL`` and the
CPU's vendor choose the path; a model's compiled training step calls the kernel for its dense layers."""

import importlib.metadata
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import mkl_matmul
from transformer_jax.models.gpt import GPT, GPTConfig
from transformer_jax.modules import dot

pytestmark = pytest.mark.skipif(
  not mkl_matmul.available(), reason='the mkl package or a C++ compiler is missing'
)

F32 = jnp.float32


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, F32)


# (M, K, N): odd sizes; 301 rows are split over the thread pool's threads, 5 rows are one block
@pytest.mark.parametrize('m, k, n', [(5, 7, 3), (301, 13, 11)], ids=['one_block', 'split_rows'])
@pytest.mark.parametrize('transpose_a', [False, True], ids=['a', 'a_T'])
@pytest.mark.parametrize('transpose_b', [False, True], ids=['b', 'b_T'])
def test_product_equals_float64(m, k, n, transpose_a, transpose_b):
  a = normal(0, (k, m) if transpose_a else (m, k))
  b = normal(1, (n, k) if transpose_b else (k, n))
  out = jax.jit(mkl_matmul.product, static_argnums=(2, 3))(a, b, transpose_a, transpose_b)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  want = (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)
  assert out.shape == (m, n) and out.dtype == F32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_empty_contraction_gives_zeros():
  out = jax.jit(mkl_matmul.product, static_argnums=(2, 3))(
    jnp.ones((3, 0)), jnp.ones((0, 4)), False, False
  )
  np.testing.assert_array_equal(out, np.zeros((3, 4), np.float32))


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


def test_vmap_runs_one_product_per_example():
  x, w = normal(5, (4, 6, 7)), normal(6, (7, 3))
  per_example = jax.jit(jax.vmap(lambda r: mkl_matmul.matmul(r, w, False)))(x)
  np.testing.assert_allclose(per_example, np.einsum('btk,kn->btn', x, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'setting, intel, dtype, applies',
  [
    ('auto', True, F32, True),
    ('auto', False, F32, False),  # AMD: XLA's float32 products are level with MKL's or ahead
    ('1', False, F32, True),
    ('0', True, F32, False),
    ('auto', True, jnp.bfloat16, False),
  ],
  ids=['auto_intel', 'auto_other_vendor', 'forced_on', 'switched_off', 'bf16'],
)
def test_setting_and_vendor_choose_the_path(monkeypatch, setting, intel, dtype, applies):
  monkeypatch.setenv('TRANSFORMER_JAX_MKL', setting)
  monkeypatch.setattr(mkl_matmul, 'intel_cpu', lambda: intel)
  assert mkl_matmul.applies(dtype, dtype, dtype) is applies


def test_missing_package_is_one_logged_line(monkeypatch, caplog):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', missing)
  with caplog.at_level(logging.INFO, logger=mkl_matmul.__name__):
    assert mkl_matmul.load_mkl.__wrapped__() is None
  assert len(caplog.records) == 1 and 'using XLA' in caplog.text


def test_gpt_training_step_uses_mkl_and_equals_xla(monkeypatch):
  """A float32 GPT (2 layers, d 12, 3 heads, vocab 37) with a tied head: the loss gradient with MKL products equals
  the one with XLA's, and the compiled step calls the kernel for every dense layer and the head."""
  cfg = GPTConfig(
    num_layers=2, d_model=12, num_heads=3, d_ff=20, vocab_size=37, max_len=8, dropout_rate=0.0,
    attention_dropout_rate=0.0, tie_output=True,
  )  # fmt: skip
  model = GPT(cfg)
  ids = jax.random.randint(jax.random.key(7), (2, 7), 0, 37)
  params = model.init(jax.random.key(8), ids)['params']

  def loss(params):
    return jnp.mean(jax.nn.logsumexp(model.apply({'params': params}, ids), axis=-1))

  with jax.default_matmul_precision('highest'):
    ours = jax.jit(jax.grad(loss))
    calls = ours.lower(params).as_text().count('transformer_jax_mkl_matmul')
    got = ours(params)
    monkeypatch.setenv('TRANSFORMER_JAX_MKL', '0')
    want = jax.jit(jax.grad(loss))(params)
  # per layer 4 products (fused QKV, attention output, two FFN), and the head: each with its 2 gradient products
  assert calls == (2 * 4 + 1) * 3
  assert 'dot_general' not in ours.lower(params).as_text(), 'a product left to XLA'
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
