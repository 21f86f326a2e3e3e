"""The residual stream's gradient written to memory once per layer (``materialize.cc``, CPU only).

The gradient reaching layer ``i``'s output is the sum of what every later layer sent back along the residual stream.
Each sum is elementwise and cheap, so XLA:CPU fuses it into every op that reads it instead of writing it out, and
the fused ops of layer ``i`` re-add the terms of all later layers: O(L^2) reads (a sixth of the op time of the course
GPT's float32 training step). :func:`hold_gradient` is the identity whose gradient goes through an opaque call, which
makes XLA write that sum out once; the call's output aliases its input, so it moves no data. (XLA drops
``lax.optimization_barrier`` before fusing on the CPU, so a barrier does not do this.)
"""

from __future__ import annotations

import jax

from transformer_jax.kernels import cpu_build

TARGET = 'transformer_jax_materialize'


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('materialize.cc', 'TransformerJaxMaterialize', TARGET)


def materialize(x: jax.Array) -> jax.Array:
  """``x``, written to its own buffer before anything reads it (CPU only)."""
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.ffi.ffi_call(TARGET, out, vmap_method='broadcast_all', input_output_aliases={0: 0})(x)


@jax.custom_vjp
def _held(x):
  return x


def _held_fwd(x):
  return x, None


def _held_bwd(_, g):
  return (materialize(g),)


_held.defvjp(_held_fwd, _held_bwd)


def hold_gradient(x: jax.Array) -> jax.Array:
  """``x``; its gradient is materialised (module docstring) where the CPU is the only device
  (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`) and the kernel builds. Elsewhere ``x`` as it is,
  differentiable in both modes."""
  if cpu_build.sole_cpu_device() and available():
    return _held(x)
  return x
