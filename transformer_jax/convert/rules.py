"""Table-driven weight mapping between PyTorch state dicts and our parameter trees.

A :class:`Mapping` lists one :class:`Rule` per parameter of ours. Both directions run off the same table, and both
check every name and shape first: a missing, unexpected or wrongly shaped weight raises one :class:`ConversionError`
that lists every offender with its expected and found shape. Nothing is skipped silently; the only PyTorch entries
never mapped are those a table declares as tied copies (``aliases``, checked equal) or as buffers (``buffers``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
from typing import Any, Callable, Iterable

import numpy as np

from transformer_jax.convert.lazy_state import LazyState, shapes_of


class ConversionError(ValueError):
  """A checkpoint and a model disagree (names, shapes, unsupported options) or a file cannot be read."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One of our parameters and the PyTorch tensor(s) it comes from.

  Both sides are seen through a canonical matrix ``(in, out)``, or a vector ``(out,)`` when ``n_in == 0``: our
  array's first ``n_in`` axes flatten into ``in``, the rest into ``out`` (``(D, H, K)`` query kernel: ``n_in=1``;
  ``(H, K, D)`` output kernel: ``n_in=2``). The PyTorch tensor is the canonical matrix itself (embeddings, GPT-2's
  ``Conv1D``) or, with ``transpose``, its transpose (``nn.Linear`` stores ``[out, in]``). Several ``torch`` keys are
  concatenated along ``out`` (one projection per head); ``part=(i, n)`` takes the ``i``-th of ``n`` equal slices of
  ``out`` (a packed ``in_proj_weight`` holding Q, K and V).
  """

  ours: str  # '/'-joined path in our params tree
  torch: tuple[str, ...]
  n_in: int = 1
  transpose: bool = False
  part: tuple[int, int] | None = None

  def canonical(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.n_in == 0:
      return (math.prod(our_shape),)
    return math.prod(our_shape[: self.n_in]), math.prod(our_shape[self.n_in :])

  def torch_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape each of this rule's PyTorch tensors must have."""
    *rows, out = self.canonical(our_shape)
    out = out * (self.part[1] if self.part else 1) // len(self.torch)
    shape = (*rows, out)
    return shape[::-1] if self.transpose and self.n_in else shape

  def to_ours(
    self,
    tensors: list[np.ndarray],
    our_shape: tuple[int, ...],
    dtype: Any = None,
    copy: bool = True,
  ) -> np.ndarray:
    """The PyTorch tensors (one per ``torch`` key) -> our C-contiguous array of ``our_shape`` (in ``dtype``, default
    theirs). ``copy=False`` lets the result be a tensor itself, or a view of it, when no copy is needed."""
    if (
      self.transpose and self.n_in and len(tensors) == 1 and not self.part and tensors[0].ndim == 2
    ):
      return _transposed_copy(tensors[0], dtype).reshape(our_shape)  # an nn.Linear weight
    mats = [t.T if self.transpose and self.n_in else t for t in tensors]
    # transposes, slices and reshapes stay views: the one copy below makes the layout and the dtype together
    mat = mats[0] if len(mats) == 1 else np.concatenate(mats, axis=-1)
    if self.part:
      mat = np.split(mat, self.part[1], axis=-1)[self.part[0]]
    mat = mat.reshape(our_shape)
    if copy and len(mats) == 1:  # concatenate copied already
      return np.array(mat, dtype=dtype, order='C')
    return np.asarray(mat, dtype=dtype, order='C')

  def to_canonical_pieces(self, ours: np.ndarray) -> list[np.ndarray]:
    """Our array -> its canonical share of each ``torch`` key (slice ``part`` of it, if packed)."""
    return np.split(ours.reshape(self.canonical(ours.shape)), len(self.torch), axis=-1)

  def from_canonical(self, mat: np.ndarray) -> np.ndarray:
    return mat.T if self.transpose and self.n_in else mat


def _transposed_copy(t: np.ndarray, dtype: Any = None) -> np.ndarray:
  """``t.T`` as a new C-contiguous array of ``dtype``, copied a strip of ``t``'s rows at a time: numpy's single pass
  over a transposed view strides through memory, about 2.5x slower for a large matrix."""
  out = np.empty(t.shape[::-1], t.dtype if dtype is None else dtype)
  for j in range(0, t.shape[0], 32):
    out[:, j : j + 32] = t[j : j + 32].T
  return out


@dataclasses.dataclass(frozen=True)
class Mapping:
  """A model family's whole table: rules, tied copies (``alias -> source``), and buffer name patterns."""

  rules: tuple[Rule, ...]
  aliases: dict[str, str] = dataclasses.field(default_factory=dict)
  buffers: tuple[
    str, ...
  ] = ()  # regexes of non-weight entries (causal masks, position ids) skipped on import


# The blocks of GPT-2, BERT and the original Transformer: formats without RMSNorm, gated FFNs, grouped-query or rotary
# attention, bias-free layers or another attention scale refuse models that use them.
CLASSIC_BLOCKS = dict(
  norm_type=('layer_norm',),
  gated_ffn=(False,),
  use_bias=(True,),
  rope_theta=(None,),
  grouped_query=(False,),
  position_offset=(0,),
  embed_norm=(False,),
  attention_scale=(None,),
)


def require(config, what: str, **allowed: tuple) -> None:
  """Raises one :class:`ConversionError` naming every field of ``config`` outside its ``allowed`` values: a model the
  format ``what`` cannot express, whose weights would load there and compute something else. Every spec's
  ``check`` calls it, so an export can never silently produce a checkpoint of a different model."""
  bad = [
    f'{k}={getattr(config, k)!r} (needs {" or ".join(map(repr, v))})'
    for k, v in allowed.items()
    if getattr(config, k) not in v
  ]
  if bad:
    raise ConversionError(f'{what} cannot express this model: ' + ', '.join(bad))


def dense(
  ours: str, torch: str, *, n_in: int = 1, transpose: bool = True, bias: bool = True
) -> list[Rule]:
  """A Dense/DenseGeneral ``ours`` from ``torch.weight`` (``nn.Linear``, or a ``Conv1D`` with ``transpose=False``)."""
  rules = [Rule(f'{ours}/kernel', (f'{torch}.weight',), n_in, transpose)]
  return rules + [Rule(f'{ours}/bias', (f'{torch}.bias',), 0)] if bias else rules


def norm(ours: str, torch: str, scale: str = 'weight', bias: str = 'bias') -> list[Rule]:
  """A LayerNorm; the course's hand-written one names its parameters ``gamma``/``beta``."""
  return [
    Rule(f'{ours}/scale', (f'{torch}.{scale}',), 0),
    Rule(f'{ours}/bias', (f'{torch}.{bias}',), 0),
  ]


def table(ours: str, torch: str) -> Rule:
  """An embedding table ``(V, D)``, stored alike on both sides."""
  return Rule(f'{ours}/embedding', (torch,))


QKVSource = str | tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def qkv(
  ours: str, weights: QKVSource, biases: QKVSource | None, *, fused: bool, transpose: bool = True
) -> list[Rule]:
  """Query/key/value projections of the attention ``ours``.

  ``weights``/``biases``: one packed key (``in_proj_weight``, GPT-2's ``c_attn``), or three tuples of keys for Q, K
  and V (one key each, or one per head). ``fused``: ours is one ``qkv`` kernel ``(D, 3, H, K)``, else three.
  """
  rules = []
  for leaf, keys, n_in in (('kernel', weights, 1), ('bias', biases, 0)):
    if keys is None:
      continue
    if fused:
      flat = (keys,) if isinstance(keys, str) else sum(keys, ())
      rules.append(Rule(f'{ours}/qkv/{leaf}', flat, n_in, transpose))
      continue
    for i, name in enumerate(('query', 'key', 'value')):
      if isinstance(keys, str):
        rules.append(Rule(f'{ours}/{name}/{leaf}', (keys,), n_in, transpose, part=(i, 3)))
      else:
        rules.append(Rule(f'{ours}/{name}/{leaf}', keys[i], n_in, transpose))
  return rules


def check_names_and_shapes(
  found: dict[str, tuple], expected: dict[str, tuple], what: str, optional: Iterable[str] = ()
) -> None:
  """Raises one :class:`ConversionError` naming every missing, unexpected and wrongly shaped entry of ``found``."""
  optional = set(optional)
  missing = [n for n in expected if n not in found]
  unexpected = [n for n in found if n not in expected and n not in optional]
  wrong = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
  if not (missing or unexpected or wrong):
    return
  lines = [f'{what} does not match the model:']
  lines += [f'  missing: {n} (expected shape {tuple(expected[n])})' for n in missing]
  lines += [f'  unexpected: {n} (found shape {tuple(found[n])})' for n in unexpected]
  lines += [
    f'  wrong shape: {n}: expected {tuple(expected[n])}, found {tuple(found[n])}' for n in wrong
  ]
  raise ConversionError('\n'.join(lines))


def expected_torch_shapes(mapping: Mapping, our_shapes: dict[str, tuple]) -> dict[str, tuple]:
  shapes = {}
  for rule in mapping.rules:
    for key in rule.torch:
      shapes[key] = rule.torch_shape(our_shapes[rule.ours])
  return shapes


def _check_table(mapping: Mapping, our_shapes: dict[str, tuple]) -> None:
  """A table must cover our parameters exactly (a gap here is a bug in the table, not in the checkpoint)."""
  check_names_and_shapes(
    {r.ours: our_shapes.get(r.ours, ()) for r in mapping.rules},
    our_shapes,
    'the conversion table (a bug: please report it)',
  )


def state_to_flat_params(
  state: collections.abc.Mapping,
  mapping: Mapping,
  our_shapes: dict[str, tuple],
  dtype: Any,
  place: Callable[[np.ndarray], Any] = lambda x: x,
) -> dict[str, Any]:
  """PyTorch-named arrays (a dict or a :class:`LazyState`) -> our ``{'a/b/kernel': place(array)}``, after checking
  every name and shape.

  One rule at a time: its tensors are looked up, converted to ``dtype`` and handed to ``place`` (e.g. a transfer to
  the device), then dropped before the next rule's are read, so with a :class:`LazyState` only the params and the
  tensors of one rule are ever in memory. The arrays handed to ``place`` share no memory with a plain dict's
  arrays; they may be a :class:`LazyState`'s own (fresh) arrays.
  """
  _check_table(mapping, our_shapes)
  buffers = [re.compile(p) for p in mapping.buffers]
  shapes = {k: v for k, v in shapes_of(state).items() if not any(b.fullmatch(k) for b in buffers)}
  check_names_and_shapes(
    shapes,
    expected_torch_shapes(mapping, our_shapes),
    'the PyTorch state dict',
    optional=mapping.aliases,
  )
  untied = [
    f'{alias} differs from {source}'
    for alias, source in mapping.aliases.items()
    if alias in shapes and not np.array_equal(state[alias], state[source])
  ]
  if untied:
    raise ConversionError(
      'tied weights differ (untied heads are not supported): ' + '; '.join(untied)
    )
  fresh = isinstance(state, LazyState)
  flat = {}
  keys, tensors = None, None
  for r in mapping.rules:
    if r.torch != keys:  # consecutive rules slicing one packed tensor read it once
      tensors = None  # drops the previous rule's tensors before the next ones are read
      keys, tensors = r.torch, [state[k] for k in r.torch]
    flat[r.ours] = place(r.to_ours(tensors, our_shapes[r.ours], dtype, copy=not fresh))
  return flat


def flat_params_to_state(
  flat: dict[str, np.ndarray], mapping: Mapping, our_shapes: dict[str, tuple]
) -> dict[str, np.ndarray]:
  """Our ``{'a/b/kernel': array}`` -> PyTorch-named arrays (packed keys reassembled), after checking ``flat``."""
  _check_table(mapping, our_shapes)
  check_names_and_shapes({k: v.shape for k, v in flat.items()}, our_shapes, 'the params')
  pieces: dict[str, list] = {}  # torch key -> [(part index, canonical piece, rule)]
  for rule in mapping.rules:
    index = rule.part[0] if rule.part else 0
    for key, piece in zip(rule.torch, rule.to_canonical_pieces(np.asarray(flat[rule.ours]))):
      pieces.setdefault(key, []).append((index, piece, rule))
  state = {}
  for key, parts in pieces.items():
    parts.sort(key=lambda p: p[0])
    state[key] = np.ascontiguousarray(
      parts[0][2].from_canonical(np.concatenate([p[1] for p in parts], axis=-1))
    )
  return state | {alias: state[source] for alias, source in mapping.aliases.items()}
