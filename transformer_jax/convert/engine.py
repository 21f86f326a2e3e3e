"""What every converter shares: arrays out of torch, our parameter shapes, layouts, and import/export by table."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer_jax.convert.lazy_state import LazyState, dtypes_of
from transformer_jax.convert.rules import Mapping, flat_params_to_state, state_to_flat_params
from transformer_jax.models import Transformer
from transformer_jax.modules.blocks import stack_layers, unstack_layers


def is_torch(value) -> bool:
  """True for torch tensors and modules, without importing torch."""
  return type(value).__module__.split('.')[0] == 'torch'


def to_numpy(value) -> np.ndarray:
  """A torch tensor (any device, bfloat16 included) or array-like -> numpy array of the same dtype."""
  if not is_torch(value):
    return np.asarray(value)
  import torch  # only reached when the caller handed us a torch object

  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # numpy has no bfloat16: go through float32, exactly
    return value.float().numpy().astype(jnp.bfloat16)
  return value.numpy()


def state_to_numpy(state) -> dict[str, np.ndarray] | LazyState:
  """A ``state_dict`` (of a module, or a mapping of tensors/arrays) -> ``{name: numpy array}``. A
  :class:`~transformer_jax.convert.rules.LazyState` (a checkpoint on disk) is returned as it is: reading all of it
  here would hold a second copy of the weights."""
  if isinstance(state, LazyState):
    return state
  if hasattr(state, 'state_dict'):
    state = state.state_dict()
  return {k: to_numpy(v) for k, v in state.items()}


def weight_dtype(state: dict[str, np.ndarray] | LazyState, requested=None) -> str:
  """The dtype name to store params in: ``requested``, else the checkpoint's own floating dtype (float32 if mixed)."""
  if requested is not None:
    return jnp.dtype(requested).name
  found = {d for d in dtypes_of(state).values() if jnp.issubdtype(d, jnp.floating)}
  return found.pop().name if len(found) == 1 else 'float32'


def init_inputs(model: nn.Module) -> tuple:
  ids = jnp.zeros((1, 1), jnp.int32)
  return (ids, ids) if isinstance(model, Transformer) else (ids,)


def loop_layout_model(model: nn.Module) -> nn.Module:
  return (
    model.clone(config=model.config.replace(scan_layers=False))
    if model.config.scan_layers
    else model
  )


def our_shapes(model: nn.Module) -> dict[str, tuple]:
  """``{'a/b/kernel': shape}`` of ``model``'s params in the loop layout (``layers_0``...), computed without memory."""
  tree = jax.eval_shape(loop_layout_model(model).init, jax.random.key(0), *init_inputs(model))[
    'params'
  ]
  return {k: v.shape for k, v in flatten(tree).items()}


def flatten(tree: dict) -> dict[str, Any]:
  """``{'a': {'b': {'kernel': x}}}`` -> ``{'a/b/kernel': x}``, the names our tables use."""
  return traverse_util.flatten_dict(tree, sep='/')


def _map_stacks(tree: dict, fn) -> dict:
  """Applies ``fn`` to every layer-stack subtree (one holding ``layers_0`` or ``layers``), recursively."""
  if 'layers_0' in tree or 'layers' in tree:
    return fn(tree)
  return {k: _map_stacks(v, fn) if isinstance(v, dict) else v for k, v in tree.items()}


def to_model_layout(params: dict, config) -> dict:
  """Loop-layout params -> the layout ``config`` asks for (stacked under ``layers`` with ``scan_layers``)."""
  if not config.scan_layers:
    return params
  return _map_stacks(params, lambda s: stack_layers(s, sum(k.startswith('layers_') for k in s)))


def to_loop_layout(params: dict) -> dict:
  """Params in either layout -> the loop layout."""
  return _map_stacks(
    params,
    lambda s: unstack_layers(s, len(jax.tree.leaves(s['layers'])[0])) if 'layers' in s else s,
  )


def import_state(
  state: dict[str, np.ndarray] | LazyState, model: nn.Module, mapping: Mapping, dtype: str
) -> dict:
  """A PyTorch-named state of numpy arrays (:func:`state_to_numpy`) -> ``model``'s params (in its layout, as jax
  arrays of ``dtype``), checked by ``mapping``. Each param becomes a jax array as soon as it is converted, so the host
  never holds a second full copy; with ``scan_layers`` the stacking makes one more at the end."""
  # the arrays handed over are held by no one else: on CPU device_put may take the numpy buffer as the jax array's
  # own (no copy); elsewhere the host copy is freed once transferred
  flat = state_to_flat_params(state, mapping, our_shapes(model), jnp.dtype(dtype), jax.device_put)
  return to_model_layout(traverse_util.unflatten_dict(flat, sep='/'), model.config)


def export_state(model: nn.Module, params: dict, mapping: Mapping, as_torch: bool = False) -> dict:
  """``model``'s params (either layout) -> a PyTorch-named state dict of numpy arrays, or torch tensors."""
  # also accept {'params': ...} variables
  params = params['params'] if set(params) == {'params'} else params
  # one transfer per leaf; unstacking numpy only makes views
  flat = flatten(to_loop_layout(jax.device_get(params)))
  state = flat_params_to_state(flat, mapping, our_shapes(model))
  return {k: to_torch_tensor(v) for k, v in state.items()} if as_torch else state


def to_torch_tensor(array: np.ndarray):
  import torch  # the caller asked for torch tensors

  if array.dtype == jnp.bfloat16:
    return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
  # flat_params_to_state made it: a fresh, contiguous, writable array
  return torch.from_numpy(array)
