"""``keep_freed_memory``: glibc accepts each setting, and a freed block larger than 2 GiB at the heap's top stays
mapped. Its effect on training is measured by ``benchmarks/page_faults.py`` (a training step's minor faults fall
about 3x); on a small program the reuse of a freed scratch buffer is not deterministic enough for a test (from 0 to 8
of 10 executions fault it in again)."""

import platform
import subprocess
import sys

import pytest

# in a fresh process, as python -m train calls it: before the first computation
PROGRAM = """
from transformer_jax.host_memory import keep_freed_memory
print(keep_freed_memory())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_glibc_accepts_every_setting():
  out = subprocess.run([sys.executable, '-c', PROGRAM], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == [
    'True'
  ]  # mallopt returned 1 for the arena count, the mmap count and the threshold


# A block above the 2 GiB that a finite trim threshold can be: freed at the heap's top, then taken again.
BIG_BLOCK = """
import ctypes, ctypes.util, resource
from transformer_jax.host_memory import keep_freed_memory
keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 9 * 2**28  # 2.25 GiB
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 2, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size // 4096)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_a_freed_block_above_2_gib_is_reused_without_faulting_it_in_again():
  """With a finite trim threshold (at most 2 GiB) glibc gave this block back on ``free``, and touching it again
  faulted in every page (GPT-2 small's training step: 664,000 faults a step)."""
  out = subprocess.run(
    [sys.executable, '-c', BIG_BLOCK], capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-3000:]
  faults, pages = map(int, out.stdout.split())
  assert faults < pages // 100, (faults, pages)
