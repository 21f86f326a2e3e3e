"""Float32 matrix products by Intel MKL (``mkl_matmul.cc``), on Intel CPUs where MKL's products beat XLA's.

On 2 cores of an Intel Xeon (Ice Lake), XLA:CPU's float32 products ran at 200-285 GFLOP/s on a transformer's
shapes and MKL's ``cblas_sgemm`` (through this kernel) at 245-310, as fast as ``torch.mm`` (PyTorch's CPU wheels use
MKL); the gap is widest in the weight gradients (``x^T g``: 202-236 against 260-298). Products are about three
quarters of a float32 training step, so this gap was most of what kept our step behind PyTorch eager there
(``benchmarks/RESULTS.md``, Ice Lake, third round). On AMD Zen 4 and Zen 5 XLA's products
are level with MKL's or well ahead (503 against 220 GFLOP/s on Zen 5), so the kernel stays off there.

:func:`matmul` is ``x @ w`` (or ``x @ w.T``) for float32 matrices: a JAX primitive, differentiable in forward and
reverse mode (both gradient products go to MKL too, reading the operands transposed in place) and vmappable.
:mod:`transformer_jax.modules.dot` sends it the float32 products of a dense layer's shape and at least
:data:`MIN_ROWS` rows (training and long prompts; decoding steps stay XLA's) when :func:`applies`.

MKL comes from the ``mkl`` package on PyPI (``pip install 'transformer_jax[mkl]'``). ``TRANSFORMER_JAX_MKL``
chooses: ``auto`` (default; Intel CPUs only), ``1`` (any x86 CPU, when installed) or ``0`` (never).
``TRANSFORMER_JAX_CPU_KERNELS=0`` turns it off with the other CPU kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from transformer_jax.kernels import cpu_build, packaged_library

log = logging.getLogger(__name__)

TARGET = 'transformer_jax_mkl_matmul'
SWITCH = 'TRANSFORMER_JAX_MKL'
F32 = jnp.dtype(jnp.float32)
# Fewer rows (tokens) than this stay XLA's. A dense layer's product and its two gradients at K x N = 768 x 3072,
# 3072 x 768 and 384 x 1536 on Ice Lake, XLA's time over ours: 0.94, 0.93, 1.33 at 128 rows; 0.90, 1.15, 1.20 at 256;
# 1.16, 1.13, 1.07 at 512; 1.22, 1.20, 1.15 at 2048. A decoding step's few rows are one MKL call on one thread,
# which reads the weights slower than XLA's two (GPT-2 small at batch 8 through MKL: 115 ms a token, against 68-71
# with XLA's products in later runs of `python -m benchmarks.decode`).
MIN_ROWS = 512


def mode() -> str:
  """``TRANSFORMER_JAX_MKL``: ``auto``, ``on`` or ``off``."""
  return packaged_library.mode(SWITCH)


def intel_cpu() -> bool:
  fields = cpu_build.cpuinfo()
  return fields is not None and fields.get('vendor_id') == 'GenuineIntel'


@functools.cache
def load_mkl() -> ctypes.CDLL | None:
  """``libmkl_rt`` from the ``mkl`` package, loaded privately; None, with one logged line, when it is not installed
  or does not load."""
  return packaged_library.load('mkl', 'libmkl_rt.so', 'MKL float32 products', log)


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


def applies(lhs_dtype, rhs_dtype, result_dtype, rows: int) -> bool:
  """The kernel is the path for a product of ``rows`` rows and these dtypes: at least :data:`MIN_ROWS` rows, all
  float32, the CPU the only device (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`),
  ``TRANSFORMER_JAX_MKL`` not ``0`` (and, when ``auto``, an Intel CPU), and the kernel available."""
  if (
    rows < MIN_ROWS
    or not jnp.dtype(lhs_dtype) == jnp.dtype(rhs_dtype) == jnp.dtype(result_dtype) == F32
  ):
    return False
  chosen = mode()
  if chosen == 'off' or (chosen == 'auto' and not intel_cpu()):
    return False
  return cpu_build.sole_cpu_device() and available()


def _call(a, b, *, transpose_a: bool, transpose_b: bool):
  rows, cols = _result_shape(a.shape, b.shape, transpose_a, transpose_b)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, cols), F32))
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _result_shape(a_shape, b_shape, transpose_a, transpose_b) -> tuple[int, int]:
  return (a_shape[1] if transpose_a else a_shape[0]), (b_shape[0] if transpose_b else b_shape[1])


# A primitive, not a custom_vjp: it is bilinear, so JAX derives forward mode, reverse mode (each gradient one more
# product with the flags flipped) and higher orders from the rules below, every product staying MKL's.
mkl_matmul_p = Primitive(TARGET)
mkl_matmul_p.def_impl(_call)
mkl_matmul_p.def_abstract_eval(
  lambda a, b, *, transpose_a, transpose_b: jax.core.ShapedArray(
    _result_shape(a.shape, b.shape, transpose_a, transpose_b), F32
  )
)
mlir.register_lowering(mkl_matmul_p, mlir.lower_fun(_call, multiple_results=False), platform='cpu')


def _a_cotangent(ct, a, b, *, transpose_a, transpose_b):
  # out = op(a) op(b): d op(a) = ct op(b)^T, so da = ct op(b)^T, or its transpose op(b) ct^T when a is transposed
  if transpose_a:
    return product(b, ct, transpose_b, True)
  return product(ct, b, False, not transpose_b)


def _b_cotangent(ct, a, b, *, transpose_a, transpose_b):
  # d op(b) = op(a)^T ct, so db = op(a)^T ct, or its transpose ct^T op(a) when b is transposed
  if transpose_b:
    return product(ct, a, True, transpose_a)
  return product(a, ct, not transpose_a, False)


ad.defbilinear(mkl_matmul_p, _a_cotangent, _b_cotangent)


def _batched(args, dims, *, transpose_a, transpose_b):
  """vmap: examples of a row-major ``a`` against one ``b`` are stacked into one product; anything else is one
  product per example."""
  (a, b), (a_dim, b_dim) = args, dims
  flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
  if b_dim is None and not transpose_a:
    a = jnp.moveaxis(a, a_dim, 0)
    size, rows = a.shape[:2]
    return mkl_matmul_p.bind(a.reshape(size * rows, -1), b, **flags).reshape(size, rows, -1), 0
  size = a.shape[a_dim] if a_dim is not None else b.shape[b_dim]
  a, b = batching.bdim_at_front(a, a_dim, size), batching.bdim_at_front(b, b_dim, size)
  return lax.map(lambda pair: mkl_matmul_p.bind(*pair, **flags), (a, b)), 0


batching.primitive_batchers[mkl_matmul_p] = _batched


def product(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
  """``op(a) @ op(b)`` float32 by MKL (CPU only), ``op`` transposing where asked: ``(M, K) x (K, N) -> (M, N)``.
  Differentiable in both modes and vmappable."""
  if not available():
    raise RuntimeError('the MKL float32 product is unavailable; see the logged line')
  return mkl_matmul_p.bind(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def matmul(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """``(M, K) x W -> (M, N)`` float32: ``W`` is ``(K, N)``, or ``(N, K)`` (an embedding table) when
  ``transposed``."""
  return product(x, w, False, transposed)
