"""The products of ``kernels/row_block_product.h``: MKL's float32 one and oneDNN's bf16 one, each output's rows split
over XLA's thread pool. Every layout equals a float64 reference of the same values, in one block and split; an empty
contraction gives zeros; a GPT's training gradient with every product on the kernel equals XLA's."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import mkl_matmul, onednn_matmul
from transformer_jax.models.gpt import GPT, GPTConfig


@dataclasses.dataclass(frozen=True)
class Kernel:
  module: object  # mkl_matmul or onednn_matmul: product(), TARGET, SWITCH, MIN_ROWS
  dtype: object  # the operands' dtype
  runs: Callable[[], bool]  # whether it can run here
  # how close a GPT's loss and gradient come to XLA's: float32 to its rounding, bf16 to a few bf16 steps of the
  # activations (the gradient's absolute tolerance: `atol`, or `atol_of_max` times the leaf's largest value)
  loss_rtol: float
  rtol: float
  atol: float = 0.0
  atol_of_max: float = 0.0


KERNELS = {
  'mkl': Kernel(
    mkl_matmul, jnp.float32, mkl_matmul.available, loss_rtol=1e-5, rtol=1e-5, atol=1e-6
  ),
  'onednn': Kernel(
    onednn_matmul,
    jnp.bfloat16,
    lambda: onednn_matmul.available() and onednn_matmul.cpu_supports(forced=True),
    loss_rtol=1e-3,
    rtol=0.05,
    atol_of_max=0.02,
  ),
}


@pytest.fixture(params=sorted(KERNELS))
def kernel(request, monkeypatch) -> Kernel:
  """Each kernel that can run here, forced on (by default MKL is chosen on Intel CPUs and oneDNN on CPUs with
  AVX512-BF16) for products of any number of rows (by default at least its ``MIN_ROWS``)."""
  chosen = KERNELS[request.param]
  if not chosen.runs():
    pytest.skip(f'{request.param}: its package, a C++ compiler or the CPU it needs is missing')
  monkeypatch.setenv(chosen.module.SWITCH, '1')
  monkeypatch.setattr(chosen.module, 'MIN_ROWS', 1)
  return chosen


def as64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# (M, K, N): odd sizes; 301 rows are split over the thread pool's threads, 5 rows are one block
@pytest.mark.parametrize('m, k, n', [(5, 7, 3), (301, 13, 11)], ids=['one_block', 'split_rows'])
@pytest.mark.parametrize('transpose_a', [False, True], ids=['a', 'a_T'])
@pytest.mark.parametrize('transpose_b', [False, True], ids=['b', 'b_T'])
def test_product_equals_float64(kernel, m, k, n, transpose_a, transpose_b):
  a = jax.random.normal(jax.random.key(0), (k, m) if transpose_a else (m, k)).astype(kernel.dtype)
  b = jax.random.normal(jax.random.key(1), (n, k) if transpose_b else (k, n)).astype(kernel.dtype)
  out = jax.jit(kernel.module.product, static_argnums=(2, 3))(a, b, transpose_a, transpose_b)
  want = (as64(a).T if transpose_a else as64(a)) @ (as64(b).T if transpose_b else as64(b))
  assert out.shape == (m, n) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_empty_contraction_gives_zeros(kernel):
  ones = lambda shape: jnp.ones(shape, kernel.dtype)  # noqa: E731
  out = jax.jit(kernel.module.product, static_argnums=(2, 3))(
    ones((3, 0)), ones((0, 4)), False, False
  )
  np.testing.assert_array_equal(out, np.zeros((3, 4), np.float32))


def test_gpt_gradient_by_the_kernel_equals_xla(kernel, monkeypatch):
  """A GPT in the kernel's dtype (2 layers, d 12, 3 heads, vocab 37, batch 2 x 7) with a tied head: the compiled
  step calls the kernel for every dense layer and the head, both gradients included, leaves no product to XLA, and
  its loss and gradient equal those with XLA's products."""
  cfg = GPTConfig(
    num_layers=2, d_model=12, num_heads=3, d_ff=20, vocab_size=37, max_len=8, dropout_rate=0.0,
    attention_dropout_rate=0.0, tie_output=True, dtype=jnp.dtype(kernel.dtype).name,
  )  # fmt: skip
  model = GPT(cfg)
  ids = jax.random.randint(jax.random.key(7), (2, 7), 0, 37)
  params = model.init(jax.random.key(8), ids)['params']

  def loss(params):
    return jnp.mean(jax.nn.logsumexp(model.apply({'params': params}, ids), axis=-1))

  with jax.default_matmul_precision('highest'):
    ours = jax.jit(jax.value_and_grad(loss))
    text = ours.lower(params).as_text()
    got = ours(params)
    monkeypatch.setenv(kernel.module.SWITCH, '0')
    reference = jax.jit(jax.value_and_grad(loss))
    assert kernel.module.TARGET not in reference.lower(params).as_text(), 'the reference is XLA'
    want = reference(params)
  # per layer 4 products (fused QKV, attention output, two FFN), and the head: each with its 2 gradient products
  assert text.count(kernel.module.TARGET) == (2 * 4 + 1) * 3
  assert 'dot_general' not in text, 'a product left to XLA'
  np.testing.assert_allclose(got[0], want[0], rtol=kernel.loss_rtol)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    atol = max(kernel.atol, kernel.atol_of_max * float(jnp.abs(b.astype(jnp.float32)).max()))
    np.testing.assert_allclose(as64(a), as64(b), rtol=kernel.rtol, atol=atol)
