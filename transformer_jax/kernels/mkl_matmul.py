"""Float32 matrix products by Intel MKL (``mkl_matmul.cc``), on Intel CPUs where MKL's products beat XLA's.

On an Intel Xeon (Ice Lake), XLA:CPU's float32 products run at 170-260 GFLOP/s on a transformer's shapes and MKL's
``cblas_sgemm`` at 230-310, the same as ``torch.mm`` (PyTorch's CPU wheels use MKL); the gap is widest in the
gradient products (``x^T g``: 195-222 against 263-305). Products are about three quarters of a float32 training
step, so this gap was most of what kept our step behind PyTorch eager there. On AMD Zen 4 and Zen 5 XLA's products
are level with MKL's or well ahead (503 against 220 GFLOP/s on Zen 5), so the kernel stays off there.

:func:`matmul` is ``x @ w`` (or ``x @ w.T``) for float32 matrices, differentiable (``jax.custom_vjp``: both gradient
products go to MKL too, reading the operands transposed in place) and vmappable (one call per example).
:mod:`transformer_jax.modules.dot` sends it the float32 products of a dense layer's shape when :func:`applies`.

MKL comes from the ``mkl`` package on PyPI (``pip install 'transformer_jax[mkl]'``). ``TRANSFORMER_JAX_MKL``
chooses: ``auto`` (default; Intel CPUs only), ``1`` (any x86 CPU, when installed) or ``0`` (never).
``TRANSFORMER_JAX_CPU_KERNELS=0`` turns it off with the other CPU kernels.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os

import jax
import jax.numpy as jnp

from transformer_jax.kernels import cpu_build

log = logging.getLogger(__name__)

TARGET = 'transformer_jax_mkl_matmul'
F32 = jnp.dtype(jnp.float32)


def mode() -> str:
  """``TRANSFORMER_JAX_MKL``: ``auto``, ``on`` or ``off``."""
  value = os.environ.get('TRANSFORMER_JAX_MKL', 'auto').lower()
  if value in ('1', 'true', 'on'):
    return 'on'
  if value in ('0', 'false', 'off'):
    return 'off'
  return 'auto'


def intel_cpu() -> bool:
  fields = cpu_build.cpuinfo()
  return fields is not None and fields.get('vendor_id') == 'GenuineIntel'


@functools.cache
def load_mkl() -> ctypes.CDLL | None:
  """``libmkl_rt`` from the ``mkl`` package, loaded privately (``RTLD_LOCAL``); None, with one logged line, when it
  is not installed or does not load."""
  try:
    files = importlib.metadata.distribution('mkl').files or ()
  except importlib.metadata.PackageNotFoundError:
    log.info('MKL float32 products: the mkl package is not installed; using XLA')
    return None
  found = [f for f in files if f.name.startswith('libmkl_rt.so')]
  if not found:
    log.warning('MKL float32 products: the mkl package has no libmkl_rt; using XLA')
    return None
  try:
    return ctypes.CDLL(str(found[0].locate()), mode=ctypes.RTLD_LOCAL)
  except OSError as error:
    log.warning('MKL float32 products unavailable, using XLA: %s', error)
    return None


@functools.cache
def available() -> bool:
  """True when MKL loads and the kernel is built, handed MKL's functions and registered (on the first call)."""
  mkl = load_mkl()
  kernel = None if mkl is None else cpu_build.library('mkl_matmul.cc')
  if kernel is None:
    return False
  kernel.TransformerJaxSetMkl(
    ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p),
    ctypes.cast(mkl.MKL_Set_Num_Threads_Local, ctypes.c_void_p),
  )
  return cpu_build.ffi_target('mkl_matmul.cc', 'TransformerJaxMklMatmul', TARGET)


def applies(lhs_dtype, rhs_dtype, result_dtype) -> bool:
  """The kernel is the path for a product of these dtypes: all float32, the CPU the only device
  (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`), ``TRANSFORMER_JAX_MKL`` not ``0`` (and, when
  ``auto``, an Intel CPU), and the kernel available."""
  if not jnp.dtype(lhs_dtype) == jnp.dtype(rhs_dtype) == jnp.dtype(result_dtype) == F32:
    return False
  chosen = mode()
  if chosen == 'off' or (chosen == 'auto' and not intel_cpu()):
    return False
  return cpu_build.sole_cpu_device() and available()


def product(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
  """``op(a) @ op(b)`` float32 by MKL (CPU only), ``op`` transposing where asked: ``(M, K) x (K, N) -> (M, N)``."""
  if not available():
    raise RuntimeError('the MKL float32 product is unavailable; see the logged line')
  rows = a.shape[1] if transpose_a else a.shape[0]
  cols = b.shape[0] if transpose_b else b.shape[1]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, cols), F32), vmap_method='sequential')
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """``(M, K) x W -> (M, N)`` float32: ``W`` is ``(K, N)``, or ``(N, K)`` (an embedding table) when
  ``transposed``."""
  return product(x, w, False, transposed)


def _matmul_fwd(x, w, transposed):
  return matmul(x, w, transposed), (x, w)


def _matmul_bwd(transposed, saved, g):
  x, w = saved
  if transposed:  # out = x w^T, w (N, K): dx = g w, dw = g^T x
    return product(g, w, False, False), product(g, x, True, False)
  return product(g, w, False, True), product(x, g, True, False)  # dx = g w^T, dw = x^T g


matmul.defvjp(_matmul_fwd, _matmul_bwd)
