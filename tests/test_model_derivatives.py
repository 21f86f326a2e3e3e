"""A whole model on a lone CPU device (the encoder-decoder: the GPT's blocks and more), where its attention, norms,
products, loss and residual gradients go to the CPU kernels, is differentiable in every mode JAX has: forward mode
(``jax.jvp``) and Hessian-vector products (forward over reverse) give XLA's numbers, the program with every kernel
off being the reference."""

import jax
import numpy as np
import pytest

from transformer_jax import Transformer, TransformerConfig
from transformer_jax.kernels import attention, cpu_build, materialize, norm
from transformer_jax.modules import softmax_cross_entropy

pytestmark = pytest.mark.skipif(
  jax.default_backend() != 'cpu' or not (attention.available() and norm.available()),
  reason='the CPU kernels are not built here',
)

# B x T >= 64 rows, so that the norms take their kernel too; odd sizes elsewhere
B, S, T, V = 2, 33, 35, 43
SHAPE = dict(num_layers=1, d_model=12, num_heads=3, d_ff=20, max_len=40)


def ids(shape, seed):
  return jax.random.randint(jax.random.key(seed), shape, 1, V)


def encoder_decoder():
  model = Transformer(TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, **SHAPE))
  source = ids((B, S), 2).at[0, 20:].set(0)  # one source padded: a padding mask meets the kernel
  return model, (source, ids((B, T), 3))


def derivatives(model, inputs, params, tangents, targets):
  """The logits' tangent (forward mode) and a Hessian-vector product of the cross-entropy (forward over reverse)."""
  logits = lambda p: model.apply(p, *inputs)  # noqa: E731
  loss = lambda p: softmax_cross_entropy(logits(p), targets).nll.mean()  # noqa: E731
  return jax.jvp(logits, (params,), (tangents,)), jax.jvp(jax.grad(loss), (params,), (tangents,))


def test_forward_mode_and_hessian_vector_products_with_the_kernels(monkeypatch):
  # causal self-attention, cross-attention and a padding mask
  model, inputs = encoder_decoder()
  params = model.init(jax.random.key(0), *inputs)
  tangents = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape, x.dtype), params)
  targets = ids((B, T), 4)
  program = jax.jit(lambda p, t: derivatives(model, inputs, p, t, targets))
  text = program.lower(params, tangents).compile().as_text()
  # (the backward kernels' own derivatives are XLA's ops on the same formulas, so a product of the Hessian and a
  # vector runs none; the gradient's residual stream still goes through the opaque call)
  for target in (attention.FORWARD, norm.FORWARD, materialize.TARGET):
    assert f'custom_call_target="{target}"' in text, target
  got = program(params, tangents)

  # every kernel off: XLA's ops alone
  monkeypatch.setattr(cpu_build, 'sole_cpu_device', lambda: False)
  plain = jax.jit(lambda p, t: derivatives(model, inputs, p, t, targets))
  assert (
    'custom_call_target="transformer_jax' not in plain.lower(params, tangents).compile().as_text()
  )
  want = plain(params, tangents)
  for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4, err_msg=f'leaf {i}')
  assert np.any(np.abs(np.asarray(jax.tree.leaves(got[1][1])[0])) > 0)
