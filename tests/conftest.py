"""Shared test settings: float32 comparisons at full matmul precision, small thread counts."""

import os

# Simulated devices (subprocess workers, notebook kernels) run each collective on one thread per device. With the
# two test workers sharing two cores, those threads can meet later than XLA's default 40 s, which aborts the process.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_collective_call_terminate_timeout_seconds=900'
)

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture
def rng():
  """A fresh numpy Generator per test, so tests do not depend on each other's draws."""
  return np.random.default_rng(0)
