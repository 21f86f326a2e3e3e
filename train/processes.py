"""The processes of a run: joining a multi-process run, which process writes, and host copies of global arrays."""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils


def initialize_distributed(config) -> None:
  """Joins a multi-process run when ``config.distributed`` (or the environment) asks for one; a no-op otherwise.

  ``distributed.enabled=True`` alone lets JAX detect the cluster (Cloud TPU pods, Slurm, Open MPI, Kubernetes). On
  GPU or CPU hosts without such a launcher, give ``coordinator_address`` (host:port of process 0), ``num_processes``
  and ``process_id`` as config fields or as ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
  Must run before anything touches a device.
  """
  cfg = config.distributed
  address = cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if not (cfg.enabled or address) or jax.distributed.is_initialized():
    return
  num_processes = cfg.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None
  process_id = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', -1))
  # CPU devices of different processes talk through gloo; the setting is ignored by other backends.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=address or None,
    num_processes=num_processes,
    process_id=None if process_id < 0 else process_id,
  )


def is_primary() -> bool:
  """Process 0 writes logs, metrics and the config; every process takes part in steps and checkpoints."""
  return jax.process_index() == 0


def primary_first(fn, name: str):
  """Runs ``fn`` on process 0, then on the others once it is done, so files ``fn`` writes to a shared workdir (the
  vocabulary, the token file) are written once and then read."""
  if jax.process_count() == 1:
    return fn()
  if is_primary():
    result = fn()
    multihost_utils.sync_global_devices(name)
    return result
  multihost_utils.sync_global_devices(name)
  return fn()


def host_copy(tree):
  """Arrays this process can use in its own computations (generation, samples): the global arrays themselves in a
  single-process run, full numpy copies gathered from every process otherwise."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.process_allgather(tree, tiled=True)
