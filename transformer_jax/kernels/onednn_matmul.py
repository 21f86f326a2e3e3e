"""bfloat16 matrix products with float32 results by oneDNN (``onednn_matmul.cc``), on CPUs with AVX512-BF16.

XLA:CPU runs a bf16 product through YNNPACK. On 2 cores of an AMD Zen 4 (``avx512_bf16``), oneDNN's
``dnnl_gemm_bf16bf16f32``, the library behind ``torch.mm`` of bf16 there, ran a bf16 encoder-decoder's training
products at 413 GFLOP/s against XLA's 359, and its step 1.2x faster (``benchmarks/RESULTS.md``, "On Zen 4, seventh
round"). Not yet measured on other CPUs with AVX512-BF16 (Zen 5, Sapphire Rapids), where it is also the default.

:func:`product` is ``op(a) @ op(b)``, either operand read transposed in place. It is not differentiated itself:
:mod:`transformer_jax.modules.dot` lowers its bf16 products (``cpu_matmul``'s, forward and gradient) to it on the CPU
where :func:`applies`.

oneDNN comes from the ``onednn-cpu-gomp`` package on PyPI (``pip install 'transformer_jax[onednn]'``), its build
threaded by GNU OpenMP, which needs the system's ``libgomp.so.1``. ``TRANSFORMER_JAX_ONEDNN`` chooses: ``auto``
(default; CPUs with ``avx512_bf16``), ``1`` (any AVX-512 CPU, when installed) or ``0`` (never).
``TRANSFORMER_JAX_CPU_KERNELS=0`` turns it off with the other CPU kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import jax
import jax.numpy as jnp

from transformer_jax.kernels import cpu_build, packaged_library

log = logging.getLogger(__name__)

TARGET = 'transformer_jax_onednn_matmul'
DISTRIBUTION = 'onednn-cpu-gomp'  # the PyPI package that holds libdnnl
SWITCH = 'TRANSFORMER_JAX_ONEDNN'
BF16 = jnp.dtype(jnp.bfloat16)
# Products of fewer output rows stay XLA's (a decoding step's few rows go to the few-row kernel before this). A bf16
# dense layer's product (and its value-and-gradient) at K x N = 512 x 2048, 2048 x 512, 384 x 1536 and 768 x 768 on
# Zen 4, XLA's time over ours: 0.64-0.89 (0.77-0.92) at 64 rows, 1.00-1.40 (0.99-1.23) at 128, 1.00-1.26 (1.04-1.36)
# at 256, 1.03-1.23 (1.07-1.28) at 512.
MIN_ROWS = 256


def cpu_supports(forced: bool) -> bool:
  """The CPU has AVX512-BF16 (``auto``), or, when ``forced``, at least the AVX-512 subset (``avx512bw``) on which
  oneDNN emulates bf16 products; oneDNN has no bf16 product below it."""
  flags = cpu_build.cpu_flags() or set()
  return ('avx512bw' if forced else 'avx512_bf16') in flags


@functools.cache
def load_onednn() -> ctypes.CDLL | None:
  """``libdnnl`` from the ``onednn-cpu-gomp`` package, loaded privately; None, with one logged line, when it is not
  installed or does not load."""
  return packaged_library.load(DISTRIBUTION, 'libdnnl.so', 'oneDNN bf16 products', log)


@functools.cache
def available() -> bool:
  """True when oneDNN and its OpenMP runtime load and the kernel is built, handed their functions and registered (on
  the first call)."""
  onednn = load_onednn()
  kernel = None if onednn is None else cpu_build.library('onednn_matmul.cc')
  if kernel is None:
    return False
  try:  # the runtime libdnnl was linked against, already loaded with it
    openmp = ctypes.CDLL('libgomp.so.1', mode=ctypes.RTLD_LOCAL)
  except OSError as error:
    log.warning('oneDNN bf16 products unavailable, using XLA: %s', error)
    return False
  kernel.TransformerJaxSetOnednn(
    ctypes.cast(onednn.dnnl_gemm_bf16bf16f32, ctypes.c_void_p),
    ctypes.cast(openmp.omp_set_num_threads, ctypes.c_void_p),
    ctypes.cast(openmp.omp_get_max_threads, ctypes.c_void_p),
  )
  return cpu_build.ffi_target('onednn_matmul.cc', 'TransformerJaxOnednnMatmul', TARGET)


def applies(lhs_dtype, rhs_dtype, rows: int) -> bool:
  """The kernel is the path for a product of ``rows`` output rows and these operand dtypes: both bf16, at least
  :data:`MIN_ROWS` rows, the CPU the only device (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`: a
  partitioner cannot split a custom call), ``TRANSFORMER_JAX_ONEDNN`` not ``0``, a CPU :func:`cpu_supports`, and the
  kernel available."""
  if rows < MIN_ROWS or not jnp.dtype(lhs_dtype) == jnp.dtype(rhs_dtype) == BF16:
    return False
  chosen = packaged_library.mode(SWITCH)
  if chosen == 'off' or not cpu_supports(forced=chosen == 'on'):
    return False
  return cpu_build.sole_cpu_device() and available()


def product(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
  """``op(a) @ op(b)`` of bf16 matrices, float32 (CPU only): ``a`` is ``(M, K)``, or ``(K, M)`` when
  ``transpose_a``; ``b`` is ``(K, N)``, or ``(N, K)`` when ``transpose_b``. Not differentiable."""
  if not available():
    raise RuntimeError('the oneDNN bf16 product is unavailable; see the logged line')
  rows = a.shape[1] if transpose_a else a.shape[0]
  cols = b.shape[0] if transpose_b else b.shape[1]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, cols), jnp.float32))
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
