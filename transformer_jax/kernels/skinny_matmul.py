"""Matrix products of a few rows (decoding steps) through a CPU kernel that reads bfloat16 weights as they are.

A decoding step multiplies one row per sequence by every weight, so it is bound by the bytes it reads. XLA:CPU
computes a one-row product with bfloat16 weights one element at a time (about 2 GB/s against 50-70 for float32), so
bfloat16 weights, half the bytes, decode slower than float32 ones. :func:`matmul` runs ``skinny_matmul.cc``: each
weight read once, widened to float32 in registers, accumulated in float32; a bf16 model's bf16 rows by bf16 weights,
from 2 rows (batched decoding, beam search), run as AVX512-BF16 dot products of pairs where the CPU has them, half
the arithmetic. :mod:`transformer_jax.modules.dot` sends it the products of at most :func:`max_rows` rows on the
CPU.

The kernel is differentiable (its tangent is two XLA products) and vmappable (one call per example). It is built
on first use for this CPU (:mod:`transformer_jax.kernels.cpu_build`); without a compiler, or with
``TRANSFORMER_JAX_CPU_KERNELS=0``, :func:`available` is False and every product stays XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.kernels import cpu_build

# the most rows sent to the kernel where it runs its portable loops (no AVX-512): at 8 rows XLA's library kernels
# (YNNPACK) are as fast there or faster
MAX_ROWS = 4
# the most rows the kernel takes (kMaxRows in skinny_limits.h)
KERNEL_ROWS = 8
TARGET = 'transformer_jax_skinny_matmul'
# /proc/cpuinfo flags of bfloat16 dot instructions, which XLA's bf16 library kernels run on
BF16_DOT_FLAGS = ('avx512_bf16', 'amx_bf16')


@functools.cache
def cpu_has_bf16_dots() -> bool:
  """True when the CPU has bfloat16 dot instructions (AVX512-BF16 or AMX), or when its flags cannot be read."""
  flags = cpu_build.cpu_flags()
  return flags is None or any(flag in flags for flag in BF16_DOT_FLAGS)


@functools.cache
def cpu_has_avx512() -> bool:
  """True when the CPU has AVX-512 (the kernel is then built with its blocks of ``skinny_avx512.h``); False where its
  flags cannot be read."""
  flags = cpu_build.cpu_flags()
  return flags is not None and 'avx512f' in flags


def max_rows(weight_dtype) -> int:
  """The most rows :mod:`transformer_jax.modules.dot` sends the kernel for weights of ``weight_dtype``.

  All the kernel takes (:data:`KERNEL_ROWS`) where it runs its AVX-512 blocks, which read the weights once at any row
  count where XLA's library kernels repack them on every call: on Zen 4, GPT-2 small's weight products at 8 rows took
  28 ms against XLA's 41, and decoding 8 sequences ran 1.4x faster in float32, 1.2x in bf16
  (``benchmarks/RESULTS.md``). The same for bfloat16 weights on a CPU without bfloat16 dot instructions, where XLA
  emulates its bf16 products (GPT-2 small, 8 sequences, bf16 on an Ice Lake: 71 ms a step through XLA, 51 through
  the kernel). Elsewhere :data:`MAX_ROWS`."""
  if cpu_has_avx512() or (jnp.dtype(weight_dtype) == jnp.bfloat16 and not cpu_has_bf16_dots()):
    return KERNEL_ROWS
  return MAX_ROWS


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('skinny_matmul.cc', 'TransformerJaxSkinnyMatmul', TARGET)


def reference(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """``(M, K) x W -> (M, N)`` float32 with XLA: ``W`` is ``(K, N)``, or ``(N, K)`` when ``transposed``."""
  dims = (((1,), (1 if transposed else 0,)), ((), ()))
  return lax.dot_general(
    x.astype(jnp.float32), w.astype(jnp.float32), dims, precision=lax.Precision.HIGHEST
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """``(M, K) x W -> (M, N)`` float32 by the kernel (CPU only; ``M <= KERNEL_ROWS``); see :func:`reference`.

  ``x`` and ``w`` are float32 or bfloat16. bf16 by bf16 at 2 rows or more runs as AVX512-BF16 dot products of pairs
  where the CPU has them (each product exact in float32, as in XLA's bf16 product), else widened like every other
  pair of dtypes."""
  if not available():
    raise RuntimeError('the skinny_matmul CPU kernel could not be built; see the logged warning')
  n = w.shape[0] if transposed else w.shape[1]
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method='sequential'
  )
  # bf16 rows stay bf16: by bf16 weights the kernel multiplies them as AVX512-BF16 pairs where the CPU has them
  x = x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)
  return call(x, w, transposed=transposed)


@matmul.defjvp
def _matmul_jvp(transposed, primals, tangents):
  x, w = primals
  dx, dw = tangents
  return matmul(x, w, transposed), reference(dx, w, transposed) + reference(x, dw, transposed)
