"""JAX primitives for the kernels whose derivatives are primitives too (:mod:`.cross_entropy`, :mod:`.norm`): a
forward kernel, its tangent map evaluated by XLA, and that map's transpose, the backward kernel; and their vmap
rule."""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


def define(name: str, call, abstract_eval, *, multiple_results: bool, cpu_only: bool) -> Primitive:
  """A primitive computed by ``call`` (its implementation and its lowering) with abstract values from
  ``abstract_eval``. ``cpu_only``: ``call`` is an FFI call of a CPU kernel, lowered for the CPU alone; otherwise it
  is XLA's ops, lowered everywhere."""
  primitive = Primitive(name)
  primitive.multiple_results = multiple_results
  primitive.def_impl(call)
  primitive.def_abstract_eval(abstract_eval)
  lowering = mlir.lower_fun(call, multiple_results=multiple_results)
  mlir.register_lowering(primitive, lowering, **({'platform': 'cpu'} if cpu_only else {}))
  return primitive


def jvp_of_reference(primitive: Primitive, reference) -> None:
  """The primitive's derivative taken through ``reference``, the same formula in XLA's ops (for derivatives of
  higher order than the kernels give)."""

  def rule(primals, tangents, **params):
    zeros_instantiated = tuple(map(ad.instantiate_zeros, tangents))
    return jax.jvp(functools.partial(reference, **params), primals, zeros_instantiated)

  ad.primitive_jvps[primitive] = rule


def batch_as_rows(primitive: Primitive, shared: tuple[int, ...] | None = ()) -> None:
  """vmap for kernels that take any leading axes as rows. Where the operands at positions ``shared`` (per-feature
  ones, such as a norm's scale) are the same for every example, the batch axis of the others moves to the front
  (an unbatched one is broadcast) and one call does all. Otherwise, and always when ``shared`` is None (a result
  summed over an example's rows), one call per example."""

  def rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if shared is not None and all(dims[i] is None for i in shared):
      args = [
        a if i in shared else batching.bdim_at_front(a, d, size)
        for i, (a, d) in enumerate(zip(args, dims))
      ]
      out = primitive.bind(*args, **params)
    else:
      args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
      out = lax.map(lambda example: primitive.bind(*example, **params), args)
    return out, ([0] * len(out) if primitive.multiple_results else 0)

  batching.primitive_batchers[primitive] = rule
