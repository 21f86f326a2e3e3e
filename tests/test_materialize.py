"""``kernels.materialize``: the identity whose gradient XLA must write out once, and the residual stacks that use it.

The numbers are the plain identity's, in value and gradient, under jit and vmap; a GPT's compiled gradient calls the
kernel once per layer, and without it has the fusions that re-add every later layer's gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import materialize
from transformer_jax.kernels import norm as norm_kernel
from transformer_jax.models.gpt import GPT, GPTConfig
from transformer_jax.modules import blocks

pytestmark = pytest.mark.skipif(
  not materialize.available(), reason='no C++ compiler for the CPU kernel'
)

B, T, D, LAYERS = 2, 5, 12, 6


def residual_stack(x, weights, hold):
  """``LAYERS`` residual layers ``x + tanh(x W)``; ``hold`` wraps each layer's output in :func:`hold_gradient`."""
  for w in weights:
    x = x + jnp.tanh(x @ w)
    x = materialize.hold_gradient(x) if hold else x
  return jnp.sum(jnp.sin(x))


def inputs():
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (B * T, D), jnp.float32)
  weights = list(0.3 * jax.random.normal(kw, (LAYERS, D, D), jnp.float32))
  return x, weights


def test_value_and_gradient_are_the_identitys():
  x, weights = inputs()
  held = jax.jit(jax.value_and_grad(residual_stack, argnums=(0, 1)), static_argnums=2)
  value, grads = held(x, weights, True)
  plain_value, plain_grads = held(x, weights, False)
  assert value == plain_value
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_array_equal(a, b)


def test_every_mode_of_derivative_is_the_identitys():
  """Forward mode, and second derivatives both ways (forward over reverse, reverse over reverse), equal the plain
  stack's; the held program's gradient still calls the kernel."""
  x, weights = inputs()
  tangent = jnp.cos(x)

  def derivatives(hold):
    grad = jax.grad(residual_stack)
    return (
      jax.jvp(lambda x: residual_stack(x, weights, hold), (x,), (tangent,)),
      jax.jvp(lambda x: grad(x, weights, hold), (x,), (tangent,)),
      jax.grad(lambda x: jnp.sum(grad(x, weights, hold) ** 2))(x),
    )

  held = jax.jit(lambda: derivatives(True))
  assert f'custom_call_target="{materialize.TARGET}"' in held.lower().compile().as_text()
  plain = jax.jit(lambda: derivatives(False))
  for a, b in zip(jax.tree.leaves(held()), jax.tree.leaves(plain()), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_materialize_is_exact_under_jit_and_vmap():
  x = jax.random.normal(jax.random.key(1), (3, 4, 7), jnp.float32)
  np.testing.assert_array_equal(jax.jit(materialize.materialize)(x), x)
  np.testing.assert_array_equal(jax.jit(jax.vmap(materialize.materialize))(x), x)
  y = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(jax.jit(materialize.materialize)(y), y)


def widest_fusion(compiled: str) -> int:
  """The most operands of one fusion in a compiled program."""
  return max(
    len(re.findall(r'%[\w.\-]+', m)) for m in re.findall(r'= \S+ fusion\(([^)]*)\)', compiled)
  )


def gpt_gradient_program() -> str:
  """The compiled gradient of a 6-layer GPT's loss."""
  cfg = GPTConfig(vocab_size=11, max_len=16, num_layers=LAYERS, d_model=48, num_heads=3, d_ff=96)
  model = GPT(cfg)
  ids = jax.random.randint(jax.random.key(2), (B, 16), 0, cfg.vocab_size)
  params = model.init(jax.random.key(3), ids)

  def loss(p):
    return jnp.mean(model.apply(p, ids) ** 2)

  return jax.jit(jax.grad(loss)).lower(params).compile().as_text()


def test_gpt_gradient_is_written_once_per_layer(monkeypatch):
  # XLA's norms: the norm kernel's backward call takes the residual gradient as an operand, so it too is written out
  # once per layer with or without the hold
  monkeypatch.setattr(norm_kernel, 'available', lambda: False)
  held = gpt_gradient_program()
  assert held.count(f'custom_call_target="{materialize.TARGET}"') == LAYERS
  monkeypatch.setattr(blocks, 'hold_gradient', lambda x: x)
  plain = gpt_gradient_program()
  assert materialize.TARGET not in plain
  # without it, a fusion re-adds the gradient of every later layer (26 operands here, against 8)
  assert widest_fusion(plain) > 2 * widest_fusion(held)


def test_elsewhere_the_plain_identity(monkeypatch):
  """Beside other devices (a mesh, whose partitioner cannot split the call) the gradient stays XLA's own, and
  forward mode still works."""
  x, weights = inputs()
  monkeypatch.setattr(materialize.cpu_build, 'sole_cpu_device', lambda: False)
  compiled = jax.jit(jax.grad(residual_stack), static_argnums=2).lower(x, weights, True).compile()
  assert materialize.TARGET not in compiled.as_text()
  tangent = jnp.ones_like(x)
  assert jax.jvp(materialize.hold_gradient, (x,), (tangent,))[1] is tangent
