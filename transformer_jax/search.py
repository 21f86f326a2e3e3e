"""The compiled search loops of :mod:`transformer_jax.generation`: greedy, sampled and beam search over a prefilled
model, each one ``lax.while_loop``.

Layout: ``R`` rows fed to the model (``B``, or ``B * W`` for ``W`` beams), ``P`` prefix tokens (the left-padded prompt,
or the start token), ``N`` new tokens, ``L = P + N`` history slots. Tokens after a row's end token are ``pad_id``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.modules.attention import MEMORY_KEY, MEMORY_VALUE
from transformer_jax.modules.take import take
from transformer_jax.search_settings import FloatSettings, SearchSettings
from transformer_jax.token_choice import choose, constrain, is_eos, prefixed_history


class Beams(NamedTuple):
  """Finished hypotheses, best first."""

  tokens: jax.Array  # (B, W, N) int32, pad_id after the end token
  scores: jax.Array  # (B, W) float32: sum of log-probabilities / length ** length_penalty


class PrefilledModel(NamedTuple):
  """A model whose prefix is in its cache, ready to decode: what the search loops need, nothing model-specific."""

  first_logits: jax.Array  # (B, V) next-token logits after the prefix
  cache: Any  # the 'cache' collection; key/value leaves end in (B, S, G, K)
  rows: Any  # per-row constants the step needs, batch-major (beam search repeats them)
  step: Callable  # (cache, rows, tokens (R,), j) -> ((R, V) logits, cache): feeds generated token j
  prefix_ids: jax.Array  # (B, P)
  prefix_valid: jax.Array  # (B, P) bool


# ----------------------------------------------------------------------------------------------------------------------
# Search loops: the first token comes from the prefill logits, then each iteration feeds the last one and picks the next


class _SampleState(NamedTuple):
  j: jax.Array  # () new tokens emitted so far
  history: jax.Array  # (B, L)
  finished: jax.Array  # (B,) emitted eos_id
  cache: Any
  rng: jax.Array


def sample_loop(prefilled: PrefilledModel, s: SearchSettings, floats: FloatSettings, rng):
  """Greedy or sampled decoding with per-row finishing -> ``(B, N)`` new tokens."""
  prefix_len = prefilled.prefix_ids.shape[1]
  history, valid = prefixed_history(prefilled, s)

  def emit(state: _SampleState, logits) -> _SampleState:
    rng, key = jax.random.split(state.rng)
    slot = prefix_len + state.j
    logits = constrain(logits, state.history, valid, slot, state.j, s)
    tokens = jnp.where(state.finished, s.pad_id, choose(logits, key, s, floats))  # (B,)
    history = lax.dynamic_update_slice_in_dim(state.history, tokens[:, None], slot, axis=1)
    return _SampleState(state.j + 1, history, state.finished | is_eos(tokens, s), state.cache, rng)

  def body(state: _SampleState) -> _SampleState:
    # (B,)
    fed = lax.dynamic_index_in_dim(state.history, prefix_len + state.j - 1, axis=1, keepdims=False)
    logits, cache = prefilled.step(state.cache, prefilled.rows, fed, state.j - 1)
    return emit(state._replace(cache=cache), logits)

  def going(state: _SampleState):
    return (state.j < s.max_new_tokens) & ~jnp.all(state.finished)

  batch = history.shape[0]
  state = emit(
    _SampleState(
      jnp.zeros((), jnp.int32), history, jnp.zeros(batch, jnp.bool_), prefilled.cache, rng
    ),
    prefilled.first_logits,
  )
  return lax.while_loop(going, body, state).history[:, prefix_len:]


class _BeamState(NamedTuple):
  j: jax.Array  # () new tokens emitted so far
  live: jax.Array  # (B, W, L) unfinished hypotheses
  live_logp: jax.Array  # (B, W) their summed log-probabilities, best first (-inf: empty)
  done: jax.Array  # (B, W, L) finished hypotheses
  done_score: jax.Array  # (B, W) their length-penalised scores, best first (-inf: empty)
  improvable: jax.Array  # (B,) a live hypothesis may still beat the finished ones
  cache: Any  # rows ordered like `live`


def beam_loop(prefilled: PrefilledModel, s: SearchSettings, floats: FloatSettings) -> Beams:
  """Beam search with a length penalty -> the ``W`` best finished hypotheses per batch row.

  Step for step Hugging Face's ``_beam_search``: the ``2W`` best continuations, of which only those ranked in the
  top ``W`` may finish (at ``eos_id``, or all of them at the last step); the ``W`` best unfinished ones live on;
  log-probabilities are taken before the constraints (:func:`constrain`) and never renormalised; and a row stops
  taking finished hypotheses as ``early_stopping`` says (see :class:`SearchSettings`).
  """
  width, n_new = s.beam_size, s.max_new_tokens
  prefix_len = prefilled.prefix_ids.shape[1]
  history, valid = prefixed_history(prefilled, s)
  batch, slots = history.shape
  valid = jnp.repeat(valid, width, axis=0)  # (B*W, L)
  rows = jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), prefilled.rows)
  penalty = lambda length: jnp.asarray(length, jnp.float32) ** floats.length_penalty  # noqa: E731
  top_ranks = jnp.arange(2 * width) < width  # (2W,)

  def emit(state: _BeamState, logits) -> _BeamState:
    slot = prefix_len + state.j
    vocab = logits.shape[-1]
    flat_live = state.live.reshape(batch * width, slots)  # (B*W, L)
    logp = constrain(jax.nn.log_softmax(logits), flat_live, valid, slot, state.j, s)
    totals = (state.live_logp[..., None] + logp.reshape(batch, width, vocab)).reshape(
      batch, width * vocab
    )
    # 2W candidates always leave W that do not end here, however many of them pick eos_id.
    cand_logp, cand = lax.top_k(totals, 2 * width)  # (B, 2W)
    parent, tokens = cand // vocab, (cand % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(state.live, parent[..., None], axis=1)  # (B, 2W, L)
    cand_seqs = lax.dynamic_update_slice_in_dim(cand_seqs, tokens[..., None], slot, axis=2)
    ends = is_eos(tokens, s) | (state.j == n_new - 1)  # (B, 2W)
    taking = state.improvable & ~(_full(state.done_score) & (s.early_stopping is True))  # (B,)
    finishing = ends & top_ranks & taking[:, None]
    done_score, done = _top(
      jnp.concatenate(
        [state.done_score, jnp.where(finishing, cand_logp / penalty(state.j + 1), -jnp.inf)], axis=1
      ),
      jnp.concatenate([state.done, cand_seqs], axis=1),
      width,
    )
    live_logp, chosen = lax.top_k(jnp.where(ends, -jnp.inf, cand_logp), width)  # (B, W)
    live = jnp.take_along_axis(cand_seqs, chosen[..., None], axis=1)
    source = (
      jnp.take_along_axis(parent, chosen, axis=1) + jnp.arange(batch)[:, None] * width
    ).reshape(-1)
    cache = _map_cache_rows(lambda x, axis: take(x, source, axis), state.cache, memory=False)
    # Can the best live hypothesis still beat the worst finished one? Scored at its current length, or ('never',
    # with a positive penalty) at the longest: log-probabilities only fall, so that bounds every continuation.
    emitted = state.j + 1
    length = emitted
    if s.early_stopping == 'never':
      length = jnp.where(floats.length_penalty > 0, n_new, emitted)
    # scores are best first, so the last is the worst finished one (-inf while a slot is empty)
    improvable = state.improvable & (live_logp[:, 0] / penalty(length) > done_score[:, -1])
    return _BeamState(emitted, live, live_logp, done, done_score, improvable, cache)

  def body(state: _BeamState) -> _BeamState:
    fed = state.live[:, :, prefix_len + state.j - 1].reshape(-1)  # (B*W,)
    logits, cache = prefilled.step(state.cache, rows, fed, state.j - 1)
    return emit(state._replace(cache=cache), logits)

  def going(state: _BeamState):
    every_row_full = jnp.all(_full(state.done_score))
    return (
      (state.j < n_new) & jnp.any(state.improvable) & ~(every_row_full & (s.early_stopping is True))
    )

  live = jnp.repeat(history[:, None], width, axis=1)  # (B, W, L)
  # identical copies: keep one until they differ
  first_only = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)
  state = _BeamState(
    jnp.zeros((), jnp.int32),
    live,
    jnp.broadcast_to(first_only, (batch, width)),
    live,
    jnp.full((batch, width), -jnp.inf),
    jnp.ones(batch, jnp.bool_),
    _map_cache_rows(lambda x, axis: jnp.repeat(x, width, axis=axis), prefilled.cache),
  )
  state = emit(state, jnp.repeat(prefilled.first_logits, width, axis=0))
  final = lax.while_loop(going, body, state)
  return Beams(final.done[:, :, prefix_len:], final.done_score)


def _full(done_score):
  """``(B,)``: every one of a row's ``W`` finished slots holds a hypothesis (scores are best first)."""
  return done_score[:, -1] > -jnp.inf


def _top(scores, seqs, k: int):
  """The ``k`` best of ``(B, C)`` scores and their ``(B, C, L)`` sequences, best first."""
  best, index = lax.top_k(scores, k)
  return best, jnp.take_along_axis(seqs, index[..., None], axis=1)


def _map_cache_rows(fn, cache, *, memory: bool = True):
  """Applies ``fn(leaf, batch_axis)`` to each key/value buffer: they all end in ``(B, S, G, K)`` (scan adds a leading
  ``L``). Cache indices (``()`` or ``(L,)``) are shared by all rows and stay as they are. ``memory=False`` leaves
  the cross-attention memory alone: all beams of a source hold the same one, so reordering beams cannot change it."""

  def leaf(path, x):
    if x.ndim < 4 or (not memory and getattr(path[-1], 'key', None) in (MEMORY_KEY, MEMORY_VALUE)):
      return x
    return fn(x, x.ndim - 4)

  return jax.tree_util.tree_map_with_path(leaf, cache)
