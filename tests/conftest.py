"""Shared test settings: float32 comparisons at full matmul precision, small thread counts."""

import jax
import numpy as np
import pytest

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture
def rng():
  """A fresh numpy Generator per test, so tests do not depend on each other's draws."""
  return np.random.default_rng(0)
