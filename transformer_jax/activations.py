"""Activation functions by the names configs use, and a feed-forward layer's activation as computed."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from transformer_jax.kernels import activation as activation_kernel
from transformer_jax.kernels import cpu_build

# 'gelu' is the exact erf form (torch.nn.GELU(), BERT); 'gelu_tanh' the tanh approximation (GPT-2's "gelu_new").
# jax.nn.gelu defaults to the approximation, so the flag is always spelled out.
ACTIVATIONS: dict[str, Callable] = {
  'relu': jax.nn.relu,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'silu': jax.nn.silu,  # x * sigmoid(x): the gate of SwiGLU (Llama, Mistral, Qwen2)
}

# The most values the CPU kernel takes: a decoding step's rows (8 rows of a 4,096-wide layer). Larger arrays are
# worth XLA's two threads (benchmarks/RESULTS.md, "On Zen 4, sixth round").
KERNEL_MAX_VALUES = 8 * 4096


def reference(name: str, x, times=None):
  """``act(x)``, or ``act(x) * times`` (a gated layer), in float32, rounded once to ``x``'s dtype: in bfloat16 each
  of the activation's elementwise ops would round (GPT-2's tanh GELU has eight), and a CPU without bf16 arithmetic
  converts around every one."""
  y = ACTIVATIONS[name](x.astype(jnp.float32))
  if times is not None:
    y = y * times.astype(jnp.float32)
  return y.astype(x.dtype)


def kernel_takes(name: str, x, times=None) -> bool:
  """The CPU kernel computes this call: a transcendental activation over few bfloat16 values on a lone CPU device
  (:data:`KERNEL_MAX_VALUES`), where XLA would split its loop over threads that cost more to wake than they save;
  ``times``, if given, of ``x``'s shape and dtype."""
  return (
    name in activation_kernel.KINDS
    and x.dtype == jnp.bfloat16
    and 0 < x.size <= KERNEL_MAX_VALUES
    and (times is None or (times.dtype, times.shape) == (x.dtype, x.shape))
    and cpu_build.sole_cpu_device()
    and activation_kernel.available()
  )


@jax.custom_jvp
def _relu_rounded(x):
  """``reference('relu', x)``, whose tangent reads the rounded output rather than ``x``: the output passes the
  tangent exactly where ``x`` does (rounding keeps a positive value positive). Nothing of the forward pass then needs
  ``x`` but the ReLU itself, so XLA fuses the bias add and rounding before it into the same loop instead of writing
  ``x`` out and keeping it for the backward pass."""
  return reference('relu', x)


@_relu_rounded.defjvp
def _relu_rounded_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = _relu_rounded(x)
  return y, jnp.where(y > 0, t, jnp.zeros_like(t))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _by_kernel(name: str, x, times):
  return activation_kernel.activation(name, x, times)


@_by_kernel.defjvp
def _by_kernel_jvp(name, primals, tangents):
  # the kernel's value; the reference's tangent (linear in the tangents, so reverse mode follows)
  _, tangent = jax.jvp(functools.partial(reference, name), primals, tangents)
  return _by_kernel(name, *primals), tangent


def activate(name: str, x, times=None):
  """A feed-forward layer's ``act(x)``, or ``act(x) * times`` when gated (``times`` of ``x``'s shape and dtype), as
  :func:`reference` computes it; a decoding step's few bfloat16 values by the CPU kernel (:func:`kernel_takes`),
  differentiable in both modes through the reference's tangents; a plain ReLU's tangent from its output
  (:func:`_relu_rounded`)."""
  if kernel_takes(name, x, times):
    return _by_kernel(name, x, times)
  if name == 'relu' and times is None:
    return _relu_rounded(x)
  return reference(name, x, times)
