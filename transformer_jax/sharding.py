"""Device meshes and parameter shardings by logical axis names.

Every parameter gets logical axis names (``embed``, ``vocab``, ``heads``, ``kv``, ``mlp``, ``layers``...) that the
block creating it declares next to its definition (:func:`declare_axes`), and rules map logical names to mesh axes.
The same model code then runs data parallel, FSDP (parameters and optimizer state split over ``fsdp``), tensor
parallel (heads, FFN hidden units and the vocabulary split over ``tensor``) or any mix, and converted checkpoints get
shardings without annotations of their own.

    mesh = make_mesh(data=-1, fsdp=2, tensor=1)
    params = jax.device_put(params, param_shardings(params, mesh))
    batch = jax.device_put(batch, batch_sharding(mesh))
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or axes); unlisted names are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ('batch', ('data', 'fsdp')),
  ('embed', 'fsdp'),
  ('vocab', 'tensor'),
  ('heads', 'tensor'),
  ('mlp', 'tensor'),
)


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
  """A ``('data', 'fsdp', 'tensor')`` mesh over ``devices`` (default: all); one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
      f'mesh sizes must be positive, with at most one -1; got data={data}, fsdp={fsdp}, tensor={tensor}'
    )
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f'cannot fill the mesh: {len(devices)} devices are not divisible by the fixed axes ({known})'
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} '
      f'devices, but {len(devices)} are available'
    )
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# (module name, parameter name) -> logical names of the parameter's axes (loop layout). Each block declares its own
# where it is defined (declare_axes below its class); names are those the parameter tree uses.
_DECLARED: dict[tuple[str, str], tuple[str | None, ...]] = {}


def declare_axes(module_names: str | tuple[str, ...], **params: tuple[str | None, ...]) -> None:
  """Declares the logical axes of the parameters ``params`` (e.g. ``kernel=('embed', 'mlp')``) of every submodule
  named ``module_names``, or of parameters created directly under those names (``module_names='*'``: a parameter
  of that name wherever it sits). A block calls this next to its definition, so a new block carries its layout."""
  for module in (module_names,) if isinstance(module_names, str) else module_names:
    for param, axes in params.items():
      _DECLARED[module, param] = tuple(axes)


def _leaf_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
  """Logical names of one parameter's axes, from its declaration (a scanned stack adds a leading ``layers``).
  Undeclared parameters: kernels ``(D, out)`` split on ``embed``; vectors and norm scales ``(D,)`` on ``embed``."""
  name, parent = path[-1], path[-2] if len(path) > 1 else ''
  scanned = 'layers' in path  # a scanned stack's leaves carry a leading layer axis
  core_ndim = ndim - scanned
  core = _DECLARED.get((parent, name), _DECLARED.get(('*', name)))
  if core is None and name == 'kernel':  # pooler, MLM transform, classifier: (D, out)
    core = ('embed',) + (None,) * (core_ndim - 1)
  elif core is None:
    core = ('embed',) if core_ndim == 1 else (None,) * core_ndim
  if len(core) != core_ndim:
    raise ValueError(f'cannot name the axes of parameter {"/".join(path)} with {ndim} dimensions')
  return ('layers',) + core if scanned else core


def shard_activation(x, *names: str | None, rules=DEFAULT_RULES):
  """Constrains activation ``x`` to the sharding its logical axis ``names`` get under the mesh set with
  ``jax.set_mesh`` (e.g. ``('batch', None, None)`` for the residual stream: split over the data axes, whole in
  ``D``). Without a mesh in context (one device, ``pmap``, generation) it returns ``x`` unchanged, so model code
  carries these hints everywhere at no cost."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, _spec(names, x.shape, mesh, rules))


def param_logical_axes(params) -> Any:
  """A pytree like ``params`` whose leaves are tuples of logical axis names."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: _leaf_axes(tuple(getattr(k, 'key', str(k)) for k in path), np.ndim(x)), params
  )


def _spec(axes, shape, mesh: Mesh, rules) -> P:
  """Logical axes -> PartitionSpec. A dimension its mesh axis does not divide stays whole: a 65-symbol vocabulary on
  a 2-way tensor axis is replicated rather than padded. A mesh axis is used at most once per parameter."""
  table = dict(rules)
  out, used = [], set()
  for name, dim in zip(axes, shape):
    target = table.get(name)
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
    size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
    if targets and dim % size == 0:
      used.update(targets)
      out.append(targets[0] if len(targets) == 1 else targets)
    else:
      out.append(None)
  return P(*out)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """``NamedSharding``\\ s for every leaf of ``params`` (arrays or ``ShapeDtypeStruct``\\ s)."""
  axes = param_logical_axes(params)
  # ``axes`` is flattened up to the structure of ``params``, so each leaf meets its whole tuple of names.
  return jax.tree.map(
    lambda x, a: NamedSharding(mesh, _spec(a, np.shape(x), mesh, rules)), params, axes
  )


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes (``data`` and ``fsdp``), the rest replicated."""
  return NamedSharding(mesh, P(dict(rules)['batch']))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  axes = dict(rules)['batch']
  return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def check_batch_divisible(batch_size: int, mesh: Mesh, rules=DEFAULT_RULES) -> None:
  """Raises unless the global batch splits evenly across the data-parallel axes."""
  size = data_parallel_size(mesh, rules)
  if batch_size % size:
    raise ValueError(
      f'batch size {batch_size} does not divide across the {size} data-parallel devices '
      f'(mesh {dict(mesh.shape)})'
    )
