"""Vendor libraries that come as PyPI packages (MKL, oneDNN): loading them privately, and the environment switch that
chooses whether a kernel uses one."""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os


def mode(variable: str) -> str:
  """The switch ``variable`` reads as ``auto`` (unset or anything else), ``on`` (``1``, ``true``, ``on``) or ``off``
  (``0``, ``false``, ``off``)."""
  value = os.environ.get(variable, 'auto').lower()
  if value in ('1', 'true', 'on'):
    return 'on'
  if value in ('0', 'false', 'off'):
    return 'off'
  return 'auto'


def load(
  distribution: str, file_prefix: str, purpose: str, log: logging.Logger
) -> ctypes.CDLL | None:
  """The shared library whose name starts with ``file_prefix`` in the installed package ``distribution``, loaded
  privately (``RTLD_LOCAL``: none of its symbols enter the process's global scope). None, with one line logged to
  ``log`` naming ``purpose``, when the package is not installed, holds no such file or it does not load."""
  try:
    files = importlib.metadata.distribution(distribution).files or ()
  except importlib.metadata.PackageNotFoundError:
    log.info('%s: the %s package is not installed; using XLA', purpose, distribution)
    return None
  found = sorted(f for f in files if f.name.startswith(file_prefix))
  if not found:
    log.warning('%s: the %s package has no %s; using XLA', purpose, distribution, file_prefix)
    return None
  try:
    return ctypes.CDLL(str(found[0].locate()), mode=ctypes.RTLD_LOCAL)
  except OSError as error:
    log.warning('%s unavailable, using XLA: %s', purpose, error)
    return None
