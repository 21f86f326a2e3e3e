"""``keep_freed_memory``: a program's scratch buffer is reused from one execution to the next instead of being mapped
and faulted in again (counted as minor page faults, in a fresh process each way)."""

import subprocess
import sys

import pytest

# A program whose scratch buffer is large (a 128 MiB intermediate), run 4 times; prints the minor page faults of
# the last three runs.
PROGRAM = """
import resource, sys
from transformer_jax.host_memory import keep_freed_memory
if sys.argv[1] == 'kept':
  assert keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x[:64]).T).sum())
x = jnp.ones((8192, 4096), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
  out = subprocess.run(
    [sys.executable, '-c', PROGRAM, mode], capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_the_scratch_buffer_is_not_faulted_in_again():
  default, kept = faults('default'), faults('kept')
  # 128 MiB of scratch is 32,768 pages: faulted in on each of the 3 runs by default, not again when kept
  assert default > 3 * 25_000, default
  assert kept < default / 3, (kept, default)
