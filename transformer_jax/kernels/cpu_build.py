"""Build a C++ XLA FFI kernel for this CPU on first use, cache it, and register it with JAX.

A source next to this file (with the headers beside it) is compiled with the host's C++ compiler (``$CXX``, else
``c++``) at ``-O3 -march=native`` against the FFI headers that ship with jaxlib, into ``$TRANSFORMER_JAX_CACHE/kernels``
(default ``~/.cache/transformer_jax/kernels``). The file name holds a hash of the sources, the flags, jaxlib's version
and the CPU's model and flags, so a cache shared between machines never hands one CPU another's code. Several
processes may build at once: each writes a private file and renames it into place.

Where there is no compiler, the build fails, or ``TRANSFORMER_JAX_CPU_KERNELS=0``, :func:`ffi_target` returns False
once per process with one logged line, and callers keep XLA's own code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fopenmp-simd', '-w')


def enabled() -> bool:
  """False when ``TRANSFORMER_JAX_CPU_KERNELS`` is ``0``, ``false`` or ``off``."""
  return os.environ.get('TRANSFORMER_JAX_CPU_KERNELS', '1').lower() not in ('0', 'false', 'off')


def cache_dir() -> Path:
  root = os.environ.get('TRANSFORMER_JAX_CACHE') or Path.home() / '.cache' / 'transformer_jax'
  return Path(root) / 'kernels'


def sole_cpu_device() -> bool:
  """The CPU is the only device: where a kernel's custom call may stand in the program (a partitioner cannot split
  one over a mesh, so sharded operands would be gathered onto each device)."""
  return jax.default_backend() == 'cpu' and jax.device_count() == 1


@functools.cache
def cpuinfo() -> dict[str, str] | None:
  """The fields of ``/proc/cpuinfo``, each key's first value (the first processor's), or None where it cannot be
  read. Read once per process; the dict is shared, so callers only read it."""
  try:
    lines = Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return None
  fields = {}
  for line in lines:
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  return fields


def cpu_signature() -> str:
  """The CPU model and feature flags (``/proc/cpuinfo``), else what ``platform`` knows."""
  fields = cpuinfo()
  if fields is None:
    return f'{platform.machine()} {platform.processor()}'
  wanted = ('model name', 'flags', 'Features', 'CPU part')
  seen = {k: fields[k] for k in wanted if k in fields}
  return f'{platform.machine()} ' + ' | '.join(f'{k}={v}' for k, v in sorted(seen.items()))


def cpu_flags() -> set[str] | None:
  """The CPU's feature flags from ``/proc/cpuinfo`` (x86), or None where they cannot be read."""
  fields = cpuinfo()
  return None if fields is None or 'flags' not in fields else set(fields['flags'].split())


def library_path(source: Path) -> Path:
  digest = hashlib.sha256()
  headers = sorted(source.parent.glob('*.h'))
  for part in (source.read_bytes(), *(h.read_bytes() for h in headers), ' '.join(FLAGS).encode()):
    digest.update(part)
  digest.update(jaxlib.__version__.encode())
  digest.update(cpu_signature().encode())
  return cache_dir() / f'{source.stem}-{digest.hexdigest()[:16]}.so'


def compile_library(source: Path, target: Path) -> None:
  """Compile ``source`` into ``target`` (atomically: a private file renamed into place)."""
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if compiler is None:
    raise RuntimeError('no C++ compiler found (set CXX)')
  target.parent.mkdir(parents=True, exist_ok=True)
  handle, private = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(handle)
  try:
    includes = [f'-I{jax.ffi.include_dir()}', f'-I{source.parent}']
    command = [compiler, *FLAGS, *includes, str(source), '-o', private]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f'{compiler} failed: {done.stderr.strip()[-400:]}')
    os.replace(private, target)
  finally:
    if os.path.exists(private):
      os.remove(private)


@functools.cache
def library(source_name: str) -> ctypes.CDLL | None:
  """The library built from ``source_name`` (a ``.cc`` beside this file): compiled on first use (about a second),
  then loaded from the cache. None, with one logged line, where it cannot be built or loaded."""
  if not enabled():
    return None
  if platform.system() != 'Linux':
    log.info('CPU kernels (%s): built on Linux only; using XLA', source_name)
    return None
  source = Path(__file__).with_name(source_name)
  try:
    path = library_path(source)
    if not path.exists():
      compile_library(source, path)
    return ctypes.CDLL(str(path))
  except (OSError, RuntimeError) as error:
    log.warning('CPU kernels of %s unavailable, using XLA: %s', source_name, error)
    return None


@functools.cache
def ffi_target(source_name: str, symbol: str, target_name: str) -> bool:
  """Register ``symbol`` of :func:`library` ``(source_name)`` as the CPU FFI target ``target_name``. True when the
  target is registered."""
  built = library(source_name)
  if built is None:
    return False
  try:
    jax.ffi.register_ffi_target(
      target_name, jax.ffi.pycapsule(getattr(built, symbol)), platform='cpu'
    )
  except AttributeError as error:
    log.warning('CPU kernel %s unavailable, using XLA: %s', target_name, error)
    return False
  return True
