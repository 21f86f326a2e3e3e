"""The products of ``kernels/row_block_product.h``: MKL's float32 one and oneDNN's bf16 one, each output's rows split
over XLA's thread pool. Every layout equals a float64 reference of the same values, in one block and split, and an
empty contraction gives zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import mkl_matmul, onednn_matmul

KERNELS = {
  # module, the switch that forces it on whatever CPU runs the tests, operand dtype, whether it can run here
  'mkl': (mkl_matmul, 'TRANSFORMER_JAX_MKL', jnp.float32, mkl_matmul.available),
  'onednn': (
    onednn_matmul,
    'TRANSFORMER_JAX_ONEDNN',
    jnp.bfloat16,
    lambda: onednn_matmul.available() and onednn_matmul.cpu_supports(forced=True),
  ),
}


@pytest.fixture(params=sorted(KERNELS))
def kernel(request, monkeypatch):
  """``(product, dtype)`` of each kernel that can run here, forced on."""
  module, switch, dtype, runs = KERNELS[request.param]
  if not runs():
    pytest.skip(f'{request.param}: its package, a C++ compiler or the CPU it needs is missing')
  monkeypatch.setenv(switch, '1')
  return jax.jit(module.product, static_argnums=(2, 3)), dtype


# (M, K, N): odd sizes; 301 rows are split over the thread pool's threads, 5 rows are one block
@pytest.mark.parametrize('m, k, n', [(5, 7, 3), (301, 13, 11)], ids=['one_block', 'split_rows'])
@pytest.mark.parametrize('transpose_a', [False, True], ids=['a', 'a_T'])
@pytest.mark.parametrize('transpose_b', [False, True], ids=['b', 'b_T'])
def test_product_equals_float64(kernel, m, k, n, transpose_a, transpose_b):
  product, dtype = kernel
  a = jax.random.normal(jax.random.key(0), (k, m) if transpose_a else (m, k)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, k) if transpose_b else (k, n)).astype(dtype)
  out = product(a, b, transpose_a, transpose_b)
  a64, b64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (a, b))
  want = (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_empty_contraction_gives_zeros(kernel):
  product, dtype = kernel
  out = product(jnp.ones((3, 0), dtype), jnp.ones((0, 4), dtype), False, False)
  np.testing.assert_array_equal(out, np.zeros((3, 4), np.float32))
