"""The CPU normalisation kernel (``kernels/norm.cc``) against a float64 reference and against XLA's path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import norm as norm_kernel
from transformer_jax.modules.normalization import LayerNorm, RMSNorm

pytestmark = pytest.mark.skipif(
  jax.default_backend() != 'cpu' or not norm_kernel.available(),
  reason='the CPU kernel is not built here',
)

KINDS = ['standard', 'unbiased_std', 'rms']
# (leading shape, D): odd sizes; 'blocks' is 600 x 131 (two pool blocks), 'many_blocks' 4,099 x 33 (four, uneven),
# 'wide' a D past any vector multiple
SHAPES = {
  'tiny': ((2, 5), 7),
  'blocks': ((2, 300), 131),
  'many_blocks': ((4099,), 33),
  'wide': ((3,), 1031),
}


def operands(shape, kind, seed=0, dtype=jnp.float32):
  lead, width = SHAPES[shape]
  keys = jax.random.split(jax.random.key(seed), 4)
  x = (jax.random.normal(keys[0], (*lead, width)) * 2.5 + 0.7).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(keys[1], (width,))
  bias = None if kind == 'rms' else 0.2 * jax.random.normal(keys[2], (width,))
  dy = jax.random.normal(keys[3], (*lead, width))
  return x, scale, bias, dy


def reference(x, scale, bias, dy, kind, eps):
  """float64 numpy: the output, and the gradients of sum(y dy) by the closed forms of ``norm.cc``'s header,
  checked here against a finite difference in :func:`test_reference_gradient_matches_a_finite_difference`."""
  x, scale, dy = (np.asarray(a, np.float64) for a in (x, scale, dy))
  width = x.shape[-1]
  c = x if kind == 'rms' else x - x.mean(-1, keepdims=True)
  if kind == 'unbiased_std':
    std = np.sqrt((c**2).sum(-1, keepdims=True) / (width - 1))
    r = 1 / (std + eps)
    b = np.where(std > 0, r**2 / ((width - 1) * np.where(std > 0, std, 1)), 0)
  else:
    r = 1 / np.sqrt((c**2).mean(-1, keepdims=True) + eps)
    b = r**3 / width
  y = c * r * scale + (0 if bias is None else np.asarray(bias, np.float64))
  g = dy * scale
  g_mean = 0 if kind == 'rms' else g.mean(-1, keepdims=True)
  dx = r * (g - g_mean) - b * c * (g * c).sum(-1, keepdims=True)
  rows = tuple(range(x.ndim - 1))
  return y, dx, (dy * c * r).sum(rows), dy.sum(rows)


def kernel_value_and_grads(x, scale, bias, dy, kind, eps):
  def loss(x, scale, bias):
    y = norm_kernel.normalize(x, scale, bias, epsilon=eps, kind=kind)
    return jnp.sum(y.astype(jnp.float32) * dy), y

  argnums = (0, 1) if bias is None else (0, 1, 2)
  (_, y), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(x, scale, bias)
  return y, grads


def perturbed_params(module, x):
  """The module's parameters away from their initial ones and from each other."""
  params = module.init(jax.random.key(1), x)
  return jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)


def compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def with_and_without_kernel(compute, monkeypatch):
  """``compute()`` through the kernel, then through XLA's path."""
  got = compute()
  with monkeypatch.context() as patch:
    patch.setattr(norm_kernel, 'available', lambda: False)
    want = compute()
  return got, want


MODULES = {
  'standard': LayerNorm(),
  'unbiased_std': LayerNorm(variant='unbiased_std', epsilon=1e-6),
  'rms': RMSNorm(),
}


def module_and_operands(kind):
  """A module of ``kind`` with perturbed parameters, and operands of 600 rows (the kernel's, not XLA's)."""
  module = MODULES[kind]
  x, _, _, dy = operands('blocks', kind)
  return module, perturbed_params(module, x), x, dy


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('shape', list(SHAPES))
def test_float32_matches_float64_reference(shape, kind):
  x, scale, bias, dy = operands(shape, kind)
  y, grads = kernel_value_and_grads(x, scale, bias, dy, kind, 1e-5)
  want_y, *want_grads = reference(x, scale, bias, dy, kind, 1e-5)
  np.testing.assert_allclose(y, want_y, atol=2e-6, rtol=1e-5)
  names = ['dx', 'dscale', 'dbias']
  for name, got, want in zip(names, grads, want_grads):
    # the column sums add up to 4,099 rows in float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize('kind', KINDS)
def test_epsilon_counts_where_the_variance_is_small(kind):
  x, scale, bias, dy = operands('tiny', kind, seed=1)
  x = x * 1e-3  # a variance of about 6e-6 against eps = 1e-5
  y, grads = kernel_value_and_grads(x, scale, bias, dy, kind, 1e-5)
  want_y, want_dx, *_ = reference(x, scale, bias, dy, kind, 1e-5)
  np.testing.assert_allclose(y, want_y, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(grads[0], want_dx, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize('kind', KINDS)
def test_reference_gradient_matches_a_finite_difference(kind):
  x, scale, bias, dy = operands('tiny', kind, seed=3)
  x64 = np.asarray(x, np.float64)
  _, dx, _, _ = reference(x64, scale, bias, dy, kind, 1e-5)
  direction = np.asarray(jax.random.normal(jax.random.key(5), x.shape), np.float64)
  step = 1e-6

  def loss(x):
    return (reference(x, scale, bias, dy, kind, 1e-5)[0] * np.asarray(dy, np.float64)).sum()

  numeric = (loss(x64 + step * direction) - loss(x64 - step * direction)) / (2 * step)
  np.testing.assert_allclose((dx * direction).sum(), numeric, rtol=1e-6)


@pytest.mark.parametrize('kind', KINDS)
def test_bfloat16_is_the_float32_result_rounded(kind):
  x, scale, bias, dy = operands('blocks', kind, dtype=jnp.bfloat16)
  y, grads = kernel_value_and_grads(x, scale, bias, dy, kind, 1e-5)
  assert y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  wide_y, wide_grads = kernel_value_and_grads(x.astype(jnp.float32), scale, bias, dy, kind, 1e-5)
  # float32 statistics, one rounding at the end: within a bf16 ulp of the float32 result (the two instantiations
  # may sum a row in different orders, so a value at a rounding boundary can round either way)
  np.testing.assert_allclose(np.asarray(y, np.float32), wide_y, rtol=2**-8, atol=1e-6)
  # dx from the bf16 cotangent: the same up to dy's rounding to bf16 and dx's own
  error = np.linalg.norm(np.asarray(grads[0], np.float32) - wide_grads[0]) / np.linalg.norm(
    wide_grads[0]
  )
  assert error < 1e-2, f'dx: relative error {error:.3g}'


@pytest.mark.parametrize(
  'module',
  [
    LayerNorm(),
    LayerNorm(use_bias=False, epsilon=1e-3),
    LayerNorm(variant='unbiased_std', epsilon=1e-6),
    RMSNorm(),
    RMSNorm(scale_plus_one=True),
  ],
  ids=['layer_norm', 'no_bias', 'unbiased_std', 'rms_norm', 'rms_plus_one'],
)
def test_modules_give_xla_paths_numbers(module, monkeypatch):
  x, _, _, dy = operands('blocks', 'standard')
  params = perturbed_params(module, x)
  loss = lambda p, x: jnp.sum(module.apply(p, x) * dy)  # noqa: E731
  assert norm_kernel.BACKWARD in compiled_text(jax.grad(loss), params, x)
  got, want = with_and_without_kernel(
    lambda: jax.value_and_grad(loss, argnums=(0, 1))(params, x), monkeypatch
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_a_constant_row_gives_finite_numbers():
  x = jnp.full((2, 9), 3.0).at[1].set(jnp.arange(9.0))
  scale, bias, dy = jnp.ones(9), jnp.zeros(9), jnp.ones((2, 9))
  for kind in KINDS:
    y, grads = kernel_value_and_grads(x, scale, None if kind == 'rms' else bias, dy, kind, 1e-6)
    assert all(np.isfinite(a).all() for a in (y, *grads)), kind
  y, _ = kernel_value_and_grads(x, scale, bias, dy, 'standard', 1e-6)
  np.testing.assert_array_equal(y[0], 0.0)


def test_no_rows_and_vmap():
  scale = jnp.ones(7)
  empty = norm_kernel.normalize(jnp.zeros((0, 7)), scale, None, epsilon=1e-5, kind='standard')
  assert empty.shape == (0, 7)
  x, scale, bias, dy = operands('tiny', 'standard')
  per_example = jax.vmap(
    lambda x: norm_kernel.normalize(x, scale, bias, epsilon=1e-5, kind='standard')
  )
  np.testing.assert_allclose(
    per_example(x), reference(x, scale, bias, dy, 'standard', 1e-5)[0], atol=2e-6
  )


def test_where_the_kernel_does_not_apply_and_refusals():
  x = jnp.ones((2, 32, 7))
  assert norm_kernel.applies(x, jnp.float32)
  assert not norm_kernel.applies(x[:, :31], jnp.float32)  # a decoding step's few rows
  assert not norm_kernel.applies(x, jnp.bfloat16)  # a cast on the way out: XLA's path fuses it
  assert not norm_kernel.applies(x.astype(jnp.float16), jnp.float16)
  assert not norm_kernel.applies(jnp.ones((64, 0)), jnp.float32)
  x = x[0, :2]
  with pytest.raises(ValueError, match='unknown norm kind'):
    norm_kernel.normalize(x, jnp.ones(7), None, epsilon=1e-5, kind='batch')
  with pytest.raises(ValueError, match='no bias'):
    norm_kernel.normalize(x, jnp.ones(7), jnp.zeros(7), epsilon=1e-5, kind='rms')


@pytest.mark.parametrize('kind', KINDS)
def test_forward_mode_and_second_derivatives_match_xlas_path(kind, monkeypatch):
  module, params, x, dy = module_and_operands(kind)
  tangents = jax.tree.map(lambda a: jax.random.normal(jax.random.key(9), a.shape), (params, x))
  apply = lambda p, x: module.apply(p, x)  # noqa: E731
  loss = lambda p, x: jnp.sum(module.apply(p, x) ** 2 * dy)  # noqa: E731

  def derivatives():
    jvp = jax.jvp(apply, (params, x), tangents)
    hvp = jax.jvp(jax.grad(loss, argnums=(0, 1)), (params, x), tangents)[1]
    return jvp, hvp

  assert norm_kernel.FORWARD in compiled_text(
    lambda p, x: jax.jvp(apply, (p, x), tangents), params, x
  )
  got, want = with_and_without_kernel(derivatives, monkeypatch)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_per_example_gradients_under_vmap(kind, monkeypatch):
  module, params, x, dy = module_and_operands(kind)
  loss = lambda p, x, dy: jnp.sum(module.apply(p, x) * dy)  # noqa: E731
  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
  assert norm_kernel.BACKWARD in compiled_text(per_example, params, x, dy)
  got, want = with_and_without_kernel(lambda: per_example(params, x, dy), monkeypatch)
  assert jax.tree.leaves(got)[0].shape[0] == x.shape[0]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_the_saved_statistics_have_their_own_tangents(kind):
  """The forward primitive's mean and ``r`` outputs: their tangents (from its JVP rule) against XLA's derivative of
  the same statistics."""
  x, scale, bias, _ = operands('tiny', kind)
  bias = jnp.zeros_like(scale) if bias is None else bias
  width = x.shape[-1]

  def statistics(x):
    _, mean, inverse = norm_kernel.forward_p.bind(
      x, scale, bias, epsilon=1e-5, kind=norm_kernel.KINDS[kind]
    )
    return mean, inverse

  def reference_statistics(x):
    mean = jnp.zeros(x.shape[:-1]) if kind == 'rms' else x.mean(-1)
    c = x - mean[..., None]
    if kind == 'unbiased_std':
      return mean, 1 / (jnp.sqrt(jnp.sum(c * c, -1) / (width - 1)) + 1e-5)
    return mean, 1 / jnp.sqrt(jnp.mean(c * c, -1) + 1e-5)

  tangent = jax.random.normal(jax.random.key(4), x.shape)
  with jax.default_matmul_precision('highest'):
    got = jax.jvp(statistics, (x,), (tangent,))
    want = jax.jvp(reference_statistics, (x,), (tangent,))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
