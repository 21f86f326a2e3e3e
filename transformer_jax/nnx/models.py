"""The model families as ``nnx.Module``\\ s: each Linen model inside ``flax.nnx.bridge.ToNNX``, its parameters
``nnx.Param``\\ s that hold the arrays of a Linen params tree and keep their logical axis names.

The bridge runs the Linen code itself on every call, so scanned layers, remat, dropout, the key/value cache and sown
attention weights compute what Linen computes. What it lacks is written here: ``ToNNX.lazy_init`` goes through this
package's unboxing ``Module.init`` (the logical names would be lost), ``ToNNX`` cannot wrap existing params, and a
Linen cache is sized by its first call (``init_cache`` sizes it ahead). The attributes are the top-level entries of the
Linen params (``model.decoder['layers_0']...``), so ``nnx.state(model, nnx.Param)`` has the Linen tree's paths.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import bridge

from transformer_jax import models, sharding

flatten, unflatten = nnx.traversals.flatten_mapping, nnx.traversals.unflatten_mapping


class Model(bridge.ToNNX):
  """A Linen model of this package as an ``nnx.Module``; each family names its Linen class.

  ``rngs``: initialises the parameters from its ``params`` stream (``default`` when it has none; the key is the one
  Linen's ``model.init(key, ...)`` would take, and the values are equal) and keeps its streams for dropout.
  ``params``: a Linen params tree to hold instead (see :func:`from_linen`). ``fields``: the Linen module's other
  fields (``BERT``'s ``add_pooler``).

  A call takes the Linen ``__call__``'s arguments, plus ``rngs=`` (an ``nnx.Rngs`` for this call's dropout; default:
  the model's own streams) and ``mutable=``: ``['intermediates']`` sows each attention layer's ``(B, H, T, S)``
  weights into ``nnx.Intermediate`` variables (``nnx.pop(model, nnx.Intermediate)`` takes them out). Other Linen
  methods run as ``model.<method>(...)`` (``hidden_states``, ``encode``, ``decode``, ``logits``).
  """

  linen_class: ClassVar[type[nn.Module]]
  num_inputs: ClassVar[int] = 1  # (B, T) id arrays the Linen __call__ takes positionally

  def __init__(self, config, *, rngs: nnx.Rngs | None = None, params=None, **fields):
    linen_model = self.linen_class(config, **fields)
    if params is None:
      if rngs is None:
        raise ValueError(f'{type(self).__name__} needs rngs=nnx.Rngs(...) or the params to hold')
      boxed = self._boxed_init(linen_model, rngs.params())
    else:
      abstract = jax.eval_shape(lambda: self._boxed_init(linen_model, jax.random.key(0)))
      boxed = _box_like(abstract, params)
    super().__init__(linen_model, rngs)
    self._set_collection('params', boxed)

  @classmethod
  def _boxed_init(cls, linen_model: nn.Module, key) -> dict:
    """The Linen params still in their ``nn.LogicallyPartitioned`` boxes (``Module.init`` unboxes them)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    _, variables = nn.Module.init_with_output(linen_model, key, *(ids,) * cls.num_inputs)
    return variables['params']

  def _set_collection(self, collection: str, tree: dict) -> None:
    """Puts a Linen collection into the attributes as NNX variables, as ``ToNNX`` does with a call's updates."""
    # Flax's eager sharding would place each boxed param on a mesh by its logical names as its variable is made,
    # and fail outside one: the names stay metadata until `shard` places the params by this package's rules.
    with nnx.use_eager_sharding(False):
      attrs = bridge.variables.linen_vars_to_nnx_attrs({collection: tree})
    for name, value in attrs.items():
      current = vars(self).get(name)
      if isinstance(current, dict):
        value = unflatten(flatten(current) | flatten(value))
      setattr(self, name, nnx.data(value))

  def _zero_cache(self, *args, **kwargs) -> None:
    """Sizes the cache by an abstract ``decode_step`` on ``args`` (nothing runs) and stores it zeroed."""
    linen_model, params = to_linen(self)
    shapes = jax.eval_shape(
      lambda: linen_model.apply(
        {'params': params}, *args, method='decode_step', mutable=['cache'], **kwargs
      )[1]['cache']
    )
    self._set_collection('cache', jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


class GPT(Model):
  """:class:`transformer_jax.GPT` (GPT-2, Llama, Mistral, Qwen2): ``model(ids, valid=..., positions=...)`` ->
  ``(B, T, V)`` float32 logits."""

  linen_class = models.GPT

  def init_cache(self, batch_size: int, slots: int) -> None:
    """Zeroed key/value buffers of ``slots`` positions for :meth:`decode_step` (``nnx.Cache`` variables; a later
    call replaces them, ``nnx.pop(model, nnx.Cache)`` drops them)."""
    ids = jnp.zeros((batch_size, slots), jnp.int32)
    self._zero_cache(ids, positions=ids)

  def decode_step(self, ids, *, positions, cache_valid=None, last_only: bool = False):
    """Cached decoding (after :meth:`init_cache`), arguments as in :meth:`transformer_jax.GPT.decode_step`:
    ``(B, T)`` ids continuing the cached sequence -> ``(B, T, V)`` float32 logits (``(B, 1, V)`` with
    ``last_only``); the cache is updated in place."""
    return self(
      ids,
      positions=positions,
      cache_valid=cache_valid,
      last_only=last_only,
      method='decode_step',
      mutable=['cache'],
    )


class Transformer(Model):
  """:class:`transformer_jax.Transformer` (also T5, BART, Marian): ``model(src_ids, tgt_ids, ...)`` ->
  ``(B, T, V)`` float32 logits; ``model.encode(...)`` and ``model.decode(...)`` as in Linen."""

  linen_class = models.Transformer
  num_inputs = 2

  def init_cache(self, memory, slots: int) -> None:
    """Zeroed buffers for :meth:`decode_step`: ``slots`` target positions over the ``(B, S, D)`` ``memory``."""
    ids = jnp.zeros((memory.shape[0], slots), jnp.int32)
    self._zero_cache(ids, memory, positions=ids)

  def decode_step(self, tgt_ids, memory, *, positions, memory_valid=None):
    """Cached decoding (after :meth:`init_cache`), arguments as in :meth:`transformer_jax.Transformer.decode_step`
    (``memory`` on the first call, ``None`` after): ``(B, T, V)`` float32 logits; the cache is updated in place."""
    return self(
      tgt_ids,
      memory,
      positions=positions,
      memory_valid=memory_valid,
      method='decode_step',
      mutable=['cache'],
    )


class EncoderModel(Model):
  """:class:`transformer_jax.EncoderModel` (T5's encoder): ``model(src_ids, src_valid=...)`` -> ``(B, S, D)``."""

  linen_class = models.EncoderModel


class BERT(Model):
  """:class:`transformer_jax.BERT`: ``model(ids, token_type_ids=..., valid=...)`` -> ``((B, T, D), (B, D))``."""

  linen_class = models.BERT


class BERTForMaskedLM(Model):
  """:class:`transformer_jax.BERTForMaskedLM`: ``(B, T)`` ids -> ``(B, T, V)`` float32 logits, or ``(B, P, V)`` at
  ``masked_positions=`` ``(B, P)``."""

  linen_class = models.BERTForMaskedLM


class BERTForSequenceClassification(Model):
  """:class:`transformer_jax.BERTForSequenceClassification`: ``(B, T)`` ids -> ``(B, num_labels)`` logits."""

  linen_class = models.BERTForSequenceClassification


FAMILIES = (GPT, Transformer, EncoderModel, BERT, BERTForMaskedLM, BERTForSequenceClassification)
_BY_LINEN = {family.linen_class: family for family in FAMILIES}


def from_linen(linen_model: nn.Module, params, *, rngs: nnx.Rngs | None = None) -> Model:
  """The NNX model of ``linen_model`` holding ``params`` (its Linen params tree; the arrays are not copied).
  ``rngs``: dropout streams (without them, a call with ``deterministic=False`` needs ``rngs=``)."""
  family = _BY_LINEN.get(type(linen_model))
  if family is None:
    known = ', '.join(cls.__name__ for cls in _BY_LINEN)
    raise TypeError(f'no NNX model for {type(linen_model).__name__}; the families are {known}')
  fields = {
    field.name: getattr(linen_model, field.name)
    for field in dataclasses.fields(linen_model)
    if field.name not in ('config', 'parent', 'name')
  }
  return family(linen_model.config, rngs=rngs, params=params, **fields)


def to_linen(model: Model) -> tuple[nn.Module, dict]:
  """``(linen_model, params)``: the Linen module and a params tree of the model's own arrays (no copy), for
  ``linen_model.apply({'params': params}, ...)``, the converters, :mod:`transformer_jax.generation` and checkpoints."""
  return model.to_nnx__module, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(model: Model, params) -> None:
  """Puts a Linen params tree (a restored checkpoint, sharded arrays) into ``model`` in place; paths and shapes must
  be the model's."""
  state = nnx.state(model, nnx.Param)
  _check_params(nnx.to_pure_dict(state), params)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def logical_axes(model: Model) -> dict:
  """:func:`transformer_jax.sharding.logical_axes` of the Linen model, read from the parameters by
  ``nnx.get_partition_spec``: the params tree with a tuple of logical axis names per leaf."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def shard(model: Model, mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> None:
  """Places every parameter on ``mesh`` by its logical axes, in place: the layout
  :func:`transformer_jax.sharding.param_shardings` gives the Linen params. Shard before making the ``nnx.Optimizer``,
  whose state then takes the same layout."""
  _, params = to_linen(model)
  shardings = sharding.param_shardings(params, logical_axes(model), mesh, rules)
  load_params(model, jax.device_put(params, shardings))


def _box_like(boxed: dict, params) -> dict:
  """``params`` in the boxes of ``boxed`` (an abstract boxed init): the arrays are kept, paths and shapes checked."""
  _check_params(nn.meta.unbox(boxed), params)
  values = flatten(params)
  return unflatten({path: box.replace_boxed(values[path]) for path, box in flatten(boxed).items()})


def _check_params(expected, params) -> None:
  """Raises unless ``params`` has the paths and shapes of ``expected`` (arrays or ``ShapeDtypeStruct``\\ s)."""
  want, got = flatten(expected), flatten(params)
  name = '/'.join
  problems = [f'missing {name(p)}' for p in want if p not in got]
  problems += [f'unexpected {name(p)}' for p in got if p not in want]
  problems += [
    f'{name(p)} has shape {tuple(np.shape(got[p]))}, the config needs {tuple(want[p].shape)}'
    for p in want
    if p in got and tuple(np.shape(got[p])) != tuple(want[p].shape)
  ]
  if problems:
    # a scanned stack holds one `layers` entry with a leading L axis, a loop one `layers_i` per layer
    raise ValueError('params do not fit the model: ' + '; '.join(problems))
