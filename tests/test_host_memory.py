"""``keep_freed_memory``: glibc accepts each setting. Its effect is measured by ``benchmarks/page_faults.py`` (a
training step's minor faults fall about 3x); on a small program the reuse of a freed scratch buffer is not
deterministic enough for a test (from 0 to 8 of 10 executions fault it in again)."""

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
