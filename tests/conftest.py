"""Shared test settings: float32 comparisons at full matmul precision, small thread counts, one compilation cache
per test session."""

import atexit
import os
import shutil
import tempfile

# Simulated devices (subprocess workers, notebook kernels) run each collective on one thread per device. With the
# two test workers sharing two cores, those threads can meet later than XLA's default 40 s, which aborts the process.
# The suite's time goes to compiling hundreds of small programs that then run for milliseconds: LLVM's machine-code
# optimisation is about a third of that, and the HLO passes that decide the numbers (fusion, layouts) run either way.
# (The notebooks, which train for hundreds of steps, take it off: tests/test_notebooks.py.)
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + ' --xla_cpu_collective_call_terminate_timeout_seconds=900 --xla_backend_optimization_level=0'
)

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')

# One persistent compilation cache per session, outside the user's: the controller (or a run without -n) makes it
# before the workers start, so both workers and every `python -m train` they run (which caches under
# $XDG_CACHE_HOME) share it. Many tests compile the same small programs from fresh model objects; each is compiled
# once per session, and a session never reuses an earlier session's programs, so every run times as a clean CI run.
if 'PYTEST_XDIST_WORKER' not in os.environ:
  os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='transformer_jax_tests_')
  atexit.register(shutil.rmtree, os.environ['XDG_CACHE_HOME'], ignore_errors=True)
  # the same for every other Python the tests start (notebook kernels, worker scripts), which read these at import
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(
    os.environ['XDG_CACHE_HOME'], 'transformer_jax', 'jax'
  )
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


@pytest.fixture
def rng():
  """A fresh numpy Generator per test, so tests do not depend on each other's draws."""
  return np.random.default_rng(0)


# The modules that take minutes each (notebooks, the README's commands, the 8-device runs, fine-tuning checkpoints),
# longest first. Under -n a module runs on one worker (--dist loadscope) and modules are handed out in collection
# order (--no-loadscope-reorder, pyproject.toml): these start first and the short modules fill in behind them, so
# the two workers finish together instead of one waiting on a long module handed out last.
LONGEST_FIRST = (
  'test_notebooks.py',
  'test_readme.py',
  'test_parallel.py',
  'test_translation_init_from.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  # a stable sort: every module keeps its own order
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
