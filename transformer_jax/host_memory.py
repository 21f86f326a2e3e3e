"""Host memory that a program's scratch buffer can reuse from one step to the next, on CPUs with glibc.

XLA:CPU allocates each execution's temporary buffer (the activations of a whole training step: 610 MiB for the
course GPT at batch 8 x 256) with ``posix_memalign`` from one of its worker threads, and frees it at the end. glibc
serves an allocation that large from a fresh ``mmap`` and returns it with ``munmap``, so every step faults in every
page again: about 160,000 minor page faults and 0.2 s of system time per step there, where PyTorch takes 19,000.

:func:`keep_freed_memory` makes glibc keep such memory instead: one arena for every thread (worker threads otherwise
get arenas that cannot hold a buffer this size and fall back to ``mmap``), no ``mmap`` for large blocks, and no
trimming of the heap's free top at all (``-1``, as ``mallopt(3)`` documents; a finite threshold caps at 2 GiB, and
GPT-2 small's step at batch 8 x 256 frees a larger top, which glibc then gave back and faulted in again: 664,000
minor faults and 3.5-4.5 s of system time per step). Freed buffers then stay mapped and a later step can reuse them
(not always: a freed buffer that smaller allocations have split cannot be). The process
keeps its peak heap mapped for its life, which is what a training or benchmark process wants, and not what a library
should impose on import: ``python -m train`` and the speed benchmarks call it, and so can a notebook.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
  """Sets glibc's allocator to keep freed memory for reuse (see the module docstring). Call it before the first JAX
  computation: a thread keeps the arena it first allocated from. Returns False (and changes nothing) where the C
  library is not glibc."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(name, value) == 1 for name, value in settings)
