"""JAX primitives for the kernels whose derivatives are primitives too (:mod:`.cross_entropy`, :mod:`.norm`): a
forward kernel, its tangent map evaluated by XLA, and that map's transpose, the backward kernel."""

from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir


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
