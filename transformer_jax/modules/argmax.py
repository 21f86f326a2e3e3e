"""``jnp.argmax`` over the last axis, by a CPU kernel where XLA's is slow.

XLA:CPU reduces a (value, index) pair one element at a time, about 1 GB/s: greedy decoding's choice among GPT-2's
50,257 logits took 0.2 ms a token. On a lone CPU device float32 goes to :mod:`transformer_jax.kernels.argmax` (10 us
a row of 50,257); anything else stays ``jnp.argmax``. A training loss takes its argmax from the cross-entropy's own
pass over the logits instead (:mod:`transformer_jax.modules.cross_entropy`): a pass of this kernel beside XLA's loss
cost more than it saved, since XLA fuses its argmax into the log-softmax.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from transformer_jax.kernels import argmax as argmax_kernel
from transformer_jax.kernels import cpu_build


def argmax(x):
  """``(..., V) -> (...)`` int32: the index of each row's largest value, the first of equal ones (the first NaN of a
  row that holds one). No gradient flows through it, as through ``jnp.argmax``."""
  if argmax_kernel.takes(x) and cpu_build.sole_cpu_device() and argmax_kernel.available():
    # an index has no tangent; stopping it here lets the kernel sit inside a differentiated function
    return argmax_kernel.argmax(lax.stop_gradient(x))
  return jnp.argmax(x, axis=-1).astype(jnp.int32)
