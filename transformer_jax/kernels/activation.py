"""A feed-forward activation over a decoding step's bfloat16 hidden units (``activation.cc``, CPU only).

In a bfloat16 decoding step, XLA:CPU fuses the activation with the roundings around it into one small loop. The
roundings tip its cost model into splitting that loop over two threads, and waking the second costs more than the
loop itself: 20-30 us for GPT-2's tanh GELU over 1,536-3,072 values, where one thread takes 2-4 us (Zen 4, KVM;
benchmarks/RESULTS.md, "On Zen 4, sixth round"). The kernel computes ``act(a)``, or ``act(a) * b`` for a gated
activation, in float32 on the calling thread and rounds once to bfloat16, the numbers of
:mod:`transformer_jax.modules.feedforward`'s float32 activation to a few float32 ulp. It has no derivative of its own:
:func:`transformer_jax.activations.activate` gives it the reference's tangents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.kernels import cpu_build

TARGET = 'transformer_jax_activation'
KINDS = {'gelu_tanh': 0, 'silu': 1}


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('activation.cc', 'TransformerJaxActivation', TARGET)


def activation(name: str, a: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """``act(a)`` (``b`` None) or ``act(a) * b`` of bfloat16 ``a`` and ``b`` of one shape, in float32, rounded once
  to bfloat16; ``name`` one of :data:`KINDS`."""
  if not available():
    raise RuntimeError('the activation CPU kernel could not be built; see the logged warning')
  if name not in KINDS:
    raise ValueError(f'the activation kernel computes {sorted(KINDS)}, not {name!r}')
  if a.dtype != jnp.bfloat16 or (b is not None and (b.dtype, b.shape) != (a.dtype, a.shape)):
    raise ValueError('the activation kernel takes bfloat16 operands of one shape')
  # elementwise over the whole buffer, so a vmapped call is one call over the stacked operands
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct(a.shape, a.dtype), vmap_method='broadcast_all'
  )
  return call(a, a if b is None else b, kind=np.int64(KINDS[name]), gated=b is not None)
