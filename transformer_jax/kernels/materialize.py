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
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from transformer_jax.kernels import cpu_build

TARGET = 'transformer_jax_materialize'


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('materialize.cc', 'TransformerJaxMaterialize', TARGET)


def _materialize_call(x):
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.ffi.ffi_call(TARGET, out, input_output_aliases={0: 0})(x)


def _identity_primitive(name: str, lowering, **platform) -> Primitive:
  """A linear identity, lowered by ``lowering`` (for ``platform`` only, if given), elementwise under vmap; its own
  tangent map is itself."""
  primitive = Primitive(name)
  primitive.def_impl(lowering)
  primitive.def_abstract_eval(lambda x: x)
  mlir.register_lowering(primitive, mlir.lower_fun(lowering, multiple_results=False), **platform)
  batching.defvectorized(primitive)
  return primitive


# ``x``, written to its own buffer before anything reads it (the FFI call; CPU only). Its transpose is the identity.
materialize_p = _identity_primitive(TARGET, _materialize_call, platform='cpu')
ad.deflinear2(materialize_p, lambda ct, _: [ct])
# the tangent of a held value: the identity, whose transpose (the gradient) is materialised
held_tangent_p = _identity_primitive('transformer_jax_held_tangent', lambda t: t)
ad.deflinear2(held_tangent_p, lambda ct, _: [materialize_p.bind(ad.instantiate_zeros(ct))])


def materialize(x: jax.Array) -> jax.Array:
  """``x``, written to its own buffer before anything reads it (CPU only)."""
  return materialize_p.bind(x)


@jax.custom_jvp
def _held(x):
  return x


@_held.defjvp
def _held_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return x, held_tangent_p.bind(t)


def hold_gradient(x: jax.Array) -> jax.Array:
  """``x``; its gradient is materialised (module docstring) where the CPU is the only device
  (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`) and the kernel builds. Differentiable in both modes
  and to any order: forward mode sees the identity, and reverse mode transposes it into the opaque call."""
  if cpu_build.sole_cpu_device() and available():
    return _held(x)
  return x
