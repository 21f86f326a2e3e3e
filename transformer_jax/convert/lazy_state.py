"""State dicts read lazily: a checkpoint on disk converted tensor by tensor, its names, shapes and dtypes known up
front."""

from __future__ import annotations

import abc
import collections.abc
from typing import Iterator

import numpy as np


class LazyState(collections.abc.Mapping):
  """A state dict that reads a tensor only when it is looked up: a checkpoint on disk converted tensor by tensor.

  ``shapes`` and ``dtypes`` describe every tensor without reading one (a safetensors header), so names, shapes and
  the checkpoint's dtype are all checked before any data is read. Each lookup returns a new array that nothing else
  holds, which the conversion may keep as the parameter itself or drop once converted.
  """

  @property
  @abc.abstractmethod
  def shapes(self) -> dict[str, tuple[int, ...]]: ...

  @property
  @abc.abstractmethod
  def dtypes(self) -> dict[str, np.dtype]: ...

  def __iter__(self) -> Iterator[str]:
    return iter(self.shapes)

  def __len__(self) -> int:
    return len(self.shapes)

  def __contains__(self, key) -> bool:
    return key in self.shapes


def shapes_of(state: collections.abc.Mapping) -> dict[str, tuple[int, ...]]:
  """``{name: shape}`` of a state dict or :class:`LazyState`, reading no tensor of the latter."""
  if isinstance(state, LazyState):
    return dict(state.shapes)
  return {k: tuple(v.shape) for k, v in state.items()}


def dtypes_of(state: collections.abc.Mapping) -> dict[str, np.dtype]:
  """``{name: dtype}`` of a state dict or :class:`LazyState`, reading no tensor of the latter."""
  if isinstance(state, LazyState):
    return dict(state.dtypes)
  return {k: v.dtype for k, v in state.items()}
