"""Device meshes and parameter shardings by logical axis names.

Every parameter gets logical axis names (``embed``, ``vocab``, ``heads``, ``kv``, ``mlp``, ``layers``...) from the
block that creates it (Flax's partitioning metadata, read by :func:`logical_axes`), and rules map logical names to
mesh axes.
The same model code then runs data parallel, FSDP (parameters and optimizer state split over ``fsdp``), tensor
parallel (heads, FFN hidden units and the vocabulary split over ``tensor``) or any mix, and converted checkpoints get
shardings without annotations of their own.

    mesh = make_mesh(fsdp=2)  # FSDP in pairs, data parallel across them
    axes = logical_axes(model, ids)
    params = jax.device_put(params, param_shardings(params, axes, mesh))
    batch = jax.device_put(batch, batch_sharding(mesh))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
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


def mesh_shape(
  device_count: int, data: int | None = None, fsdp: int = 1, tensor: int = 1
) -> tuple[int, int, int]:
  """The ``(data, fsdp, tensor)`` sizes of :func:`make_mesh`'s mesh over ``device_count`` devices.

  Each size is a device count, or -1 on one axis at most: the devices the other axes leave. ``data=None`` (the
  default) is data parallelism over whatever the other axes leave: the rest of the devices, or 1 when ``fsdp`` or
  ``tensor`` is -1. So the defaults are data parallel over every device, ``fsdp=-1`` is FSDP over every device and
  ``tensor=2`` tensor parallel in pairs, data parallel across them.
  """
  given = [s for s in (data, fsdp, tensor) if s is not None]
  if given.count(-1) > 1 or any(s == 0 or s < -1 for s in given):
    raise ValueError(
      f'mesh sizes must be positive, or -1 (the rest) on one axis at most; got data={data}, fsdp={fsdp}, '
      f'tensor={tensor}'
    )
  if data is None:
    data = 1 if -1 in (fsdp, tensor) else -1
  sizes = [data, fsdp, tensor]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if device_count % known:
      raise ValueError(
        f'cannot fill the mesh: {device_count} devices are not divisible by the fixed axes ({known})'
      )
    sizes[sizes.index(-1)] = device_count // known
  if int(np.prod(sizes)) != device_count:
    raise ValueError(
      f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} '
      f'devices, but {device_count} are available'
    )
  return tuple(sizes)


def make_mesh(
  data: int | None = None, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None
) -> Mesh:
  """A ``('data', 'fsdp', 'tensor')`` mesh over ``devices`` (default: all), sized as :func:`mesh_shape` says:
  ``make_mesh()`` data parallel, ``make_mesh(fsdp=-1)`` FSDP over every device, ``make_mesh(fsdp=4, tensor=2)``
  FSDP x tensor parallel, data parallel over what is left."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(len(devices), data, fsdp, tensor)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


class Module(nn.Module):
  """A Linen module whose blocks name the logical axes of each parameter where they create it
  (``nn.with_logical_partitioning``), and whose ``init`` returns plain arrays: the names are read back with
  :func:`logical_axes`, so parameter trees, converters and checkpoints never meet Flax's boxes."""

  @nn.nowrap
  def init_with_output(self, *args, **kwargs):
    out, variables = super().init_with_output(*args, **kwargs)
    return out, nn.meta.unbox(variables)


def dense_inits(
  kernel_init: Callable, kernel_axes: tuple[str | None, ...], inputs: int = 1
) -> dict:
  """``kernel_init`` and ``bias_init`` of an ``nn.Dense`` / ``nn.DenseGeneral`` whose kernel has the logical
  ``kernel_axes``; the (zero-initialised) bias takes the output axes, those after the first ``inputs``."""
  return dict(
    kernel_init=nn.with_logical_partitioning(kernel_init, kernel_axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, kernel_axes[inputs:]),
  )


def logical_axes(model: nn.Module, *args, **kwargs) -> Any:
  """A pytree like ``model.init(key, *args, **kwargs)['params']`` whose leaves are tuples of logical axis names, one
  per dimension, as the blocks declared them (a scanned stack adds a leading ``layers``). Nothing is computed: the
  model is initialised abstractly. A parameter created without names is an error, so a new block must carry its
  layout."""
  boxed = jax.eval_shape(
    lambda: nn.Module.init_with_output(model, jax.random.key(0), *args, **kwargs)[1]
  )['params']
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  unnamed, miscounted = [], []

  def names(path, leaf):
    where = jax.tree_util.keystr(path, simple=True, separator='/')
    if not is_box(leaf):
      unnamed.append(where)
    elif len(leaf.names) != np.ndim(leaf.value):
      miscounted.append(
        f'{where} has {np.ndim(leaf.value)} dimensions but {len(leaf.names)} names {leaf.names}'
      )
    return tuple(leaf.names) if is_box(leaf) else None

  axes = jax.tree_util.tree_map_with_path(names, boxed, is_leaf=is_box)
  problems = miscounted + (
    [
      f'no logical axis names on {", ".join(unnamed)} (create them with nn.with_logical_partitioning)'
    ]
    if unnamed
    else []
  )
  if problems:
    raise ValueError('; '.join(problems))
  return axes


def shard_activation(x, *names: str | None, rules=DEFAULT_RULES):
  """Constrains activation ``x`` to the sharding its logical axis ``names`` get under the mesh set with
  ``jax.set_mesh`` (e.g. ``('batch', None, None)`` for the residual stream: split over the data axes, whole in
  ``D``). Without a mesh in context (one device, ``pmap``, generation) it returns ``x`` unchanged, so model code
  carries these hints everywhere at no cost."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, _spec(names, x.shape, mesh, rules))


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


def param_shardings(params, axes, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """``NamedSharding``\\ s for every leaf of ``params`` (arrays or ``ShapeDtypeStruct``\\ s), from their logical
  ``axes`` (:func:`logical_axes` of the model)."""
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
