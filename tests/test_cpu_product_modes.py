"""The CPU's products by primitive (``modules.dot``: ``cpu_matmul`` of bf16 or float32 operands, with and without a
bias, and ``bf16_einsum``) in every mode of derivative: forward mode and Hessian-vector products against the same
products in float32 by XLA, per-example gradients under vmap, and a whole bf16 GPT's forward mode and Hessian-vector
product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import GPT, GPTConfig
from transformer_jax.modules import dot

pytestmark = pytest.mark.skipif(
  jax.default_backend() != 'cpu', reason='the products of the CPU only'
)

M, K, N = 11, 7, 5  # 11 rows: past the few-row kernel's limit, so the products are the primitive's


def bf16_normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape).astype(jnp.bfloat16)


def matmul_case(transposed, biased, dtype=jnp.bfloat16):
  """``(ours, reference, operands)``: the product of ``dtype`` operands with a float32 result, and XLA's float32
  product of the same values."""
  x, w = bf16_normal(0, (M, K)), bf16_normal(1, (N, K) if transposed else (K, N))
  x, w = x.astype(dtype), w.astype(dtype)
  bias = bf16_normal(2, (N,)).astype(jnp.float32) if biased else None
  spec = 'mk,nk->mn' if transposed else 'mk,kn->mn'

  def ours(x, w, *bias):
    return dot.cpu_matmul(x, w, bias[0] if bias else None, transposed, jnp.float32)

  def reference(x, w, *bias):
    out = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))
    return out + bias[0] if bias else out

  return ours, reference, (x, w) + ((bias,) if biased else ())


def einsum_case():
  spec = 'BTGQK,BSGK->BGQTS'  # attention's logits, grouped query heads
  q, k = bf16_normal(3, (2, 5, 3, 2, 4)), bf16_normal(4, (2, 7, 3, 4))
  ours = lambda q, k: dot.bf16_einsum(spec, q, k, jnp.float32)  # noqa: E731
  reference = lambda q, k: jnp.einsum(spec, q.astype(jnp.float32), k.astype(jnp.float32))  # noqa: E731
  return ours, reference, (q, k)


CASES = {
  'kernel_KN': lambda: matmul_case(False, False),
  'table_NK_biased': lambda: matmul_case(True, True),
  'kernel_KN_biased': lambda: matmul_case(False, True),
  'float32_kernel_KN_biased': lambda: matmul_case(False, True, jnp.float32),
  'float32_table_NK': lambda: matmul_case(True, False, jnp.float32),
  'einsum': einsum_case,
}


def tangents_of(operands):
  return tuple(bf16_normal(10 + i, x.shape).astype(x.dtype) for i, x in enumerate(operands))


@pytest.mark.parametrize('case', list(CASES))
def test_forward_mode_is_the_product_of_the_tangents(case):
  ours, reference, operands = CASES[case]()
  tangents = tangents_of(operands)
  (value, tangent), (want_value, want_tangent) = (
    jax.jvp(f, operands, tangents) for f in (ours, reference)
  )
  assert tangent.dtype == jnp.float32
  # bf16 values multiply exactly in float32; only the sums' order differs
  np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tangent, want_tangent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', list(CASES))
def test_hessian_vector_product_matches_float32(case):
  """Forward over reverse: the gradient's products (in bf16: the output gradient rounded to bf16, the operands'
  gradients rounded to bf16) differentiated, within a few bf16 roundings (float32: 1e-5) of the float32 Hessian's
  product."""
  ours, reference, operands = CASES[case]()
  tangents = tangents_of(operands)

  def hvp(f):
    grad = jax.grad(lambda *xs: jnp.sum(jnp.sin(f(*xs))), tuple(range(len(operands))))
    return jax.jvp(grad, operands, tangents)[1]

  tolerance = 1e-5 if operands[0].dtype == jnp.float32 else 2e-2
  for got, want in zip(hvp(ours), hvp(reference), strict=True):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)


def test_per_example_gradients_under_vmap():
  ours, _, (x, w, bias) = matmul_case(False, True)
  xs = jnp.stack([x, -2 * x, x[::-1]])  # (3, M, K): three examples, one weight and bias
  loss = lambda w, b, x: jnp.sum(jnp.sin(ours(x, w, b)))  # noqa: E731
  per_example = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), in_axes=(None, None, 0)))(w, bias, xs)
  for i in range(3):
    want = jax.grad(loss, (0, 1))(w, bias, xs[i])
    for got, expected in zip(per_example, want, strict=True):
      np.testing.assert_allclose(
        np.asarray(got[i], np.float32), np.asarray(expected, np.float32), rtol=2e-2, atol=2e-2
      )


def test_bf16_gpt_forward_mode_and_hessian_vector_product():
  """A bf16 GPT (float32 master weights, 80 rows: the many-row bf16 products, the bf16 attention and norm kernels)
  against the same model in float32: the logits' tangent and the Hessian-vector product of its loss within bf16's
  precision."""
  config = dict(vocab_size=43, num_layers=2, d_model=12, num_heads=3, d_ff=20, max_len=40)
  ids = jax.random.randint(jax.random.key(1), (2, 40), 1, 43)
  models = {dtype: GPT(GPTConfig(dtype=dtype, **config)) for dtype in ('bfloat16', 'float32')}
  params = models['float32'].init(jax.random.key(0), ids)
  tangents = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape), params)

  def derivatives(model):
    logits = lambda p: model.apply(p, ids)  # noqa: E731
    loss = lambda p: jnp.mean(jax.nn.logsumexp(logits(p), -1))  # noqa: E731
    jvp = jax.jvp(logits, (params,), (tangents,))[1]
    return jvp, jax.jvp(jax.grad(loss), (params,), (tangents,))[1]

  got = jax.jit(lambda: derivatives(models['bfloat16']))()
  want = jax.jit(lambda: derivatives(models['float32']))()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b)
