"""Choosing the next token: greedy, or sampled after temperature, top-k and top-p; and the n-gram ban of
``no_repeat_ngram_size``. Pure functions of ``(R, V)`` float32 logits, traced inside the search loops."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.modules.argmax import argmax

if TYPE_CHECKING:
  from transformer_jax.search import PrefilledModel
  from transformer_jax.search_settings import FloatSettings, SearchSettings


def choose(logits, rng, s: SearchSettings, floats: FloatSettings):
  """``(R, V)`` float32 logits -> ``(R,)`` int32 tokens: greedy, or sampled after temperature, top-k and top-p."""
  if not s.sample:
    return argmax(logits)
  logits = logits / floats.temperature
  if s.top_k is not None:
    kth = lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]  # (R, 1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.nucleus:
    logits = nucleus(logits, floats.top_p)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


def nucleus(logits, top_p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches ``top_p``; the rest get ``-inf``."""
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # (R, V) descending
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)  # (R, 1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def repeated_ngrams(history, valid, length, n: int, vocab_size: int):
  """``(R, V)`` True for tokens that would complete an n-gram already in ``history[:, :length]``.

  ``history``/``valid``: ``(R, L)`` tokens and real-token flags; ``length``: the slot the next token goes to. n-grams
  that touch padding do not count.
  """
  rows, slots = history.shape
  count = slots - n + 1
  windows = jnp.stack([history[:, i : i + count] for i in range(n)], axis=-1)  # (R, L-n+1, n)
  # (R, L-n+1)
  windows_real = jnp.stack([valid[:, i : i + count] for i in range(n)], axis=-1).all(-1)
  # The last n-1 tokens written; a slice of a window array keeps its start traced but its size static.
  # The window starting n-1 slots back holds the last n-1 tokens, then the slot about to be written. Before n-1
  # tokens exist the clamped start reads garbage, but then no window is complete and nothing is banned.
  start = jnp.maximum(length - n + 1, 0)
  tail = lax.dynamic_slice_in_dim(windows, start, 1, axis=1)[:, 0, :-1]  # (R, n-1)
  tail_real = lax.dynamic_slice_in_dim(windows_real, start, 1, axis=1)  # (R, 1)
  ends_before = jnp.arange(count) + n - 1 < length  # (L-n+1,): windows already written in full
  # (R, L-n+1)
  hit = (windows[..., :-1] == tail[:, None]).all(-1) & windows_real & ends_before & tail_real
  banned = (
    jnp.zeros((rows, vocab_size), jnp.int32)
    .at[jnp.arange(rows)[:, None], windows[..., -1]]
    .add(hit)
  )
  return banned > 0


def bad_word_endings(history, valid, length, words, vocab_size: int):
  """``(R, V)`` True for the last token of each word in ``words`` whose other tokens end ``history[:, :length]``
  (a one-token word is always banned)."""
  banned = jnp.zeros((history.shape[0], vocab_size), jnp.bool_)
  for word in words:
    *head, last = word
    hit = jnp.ones(history.shape[0], jnp.bool_)
    if head:
      start = jnp.maximum(length - len(head), 0)
      tail = lax.dynamic_slice_in_dim(history, start, len(head), axis=1)  # (R, len(head))
      real = lax.dynamic_slice_in_dim(valid, start, len(head), axis=1).all(-1)
      hit = (tail == jnp.asarray(head)).all(-1) & real & (length >= len(head))
    banned = banned.at[:, last].set(banned[:, last] | hit)
  return banned


def constrain(scores, history, valid, length, emitted, s: SearchSettings):
  """Hugging Face's logits processors, in its order, on ``(R, V)`` logits or log-probabilities: the n-gram and bad
  word bans and ``min_new_tokens`` set ``-inf``; a forced token gets 0 and every other ``-inf``.

  ``length``: the history slot of the token being chosen; ``emitted``: the new tokens before it.
  """
  vocab = jnp.arange(scores.shape[-1])
  if s.no_repeat_ngram_size:
    banned = repeated_ngrams(history, valid, length, s.no_repeat_ngram_size, scores.shape[-1])
    scores = jnp.where(banned, -jnp.inf, scores)
  if s.bad_words:
    banned = bad_word_endings(history, valid, length, s.bad_words, scores.shape[-1])
    scores = jnp.where(banned, -jnp.inf, scores)
  if s.min_new_tokens and s.eos_id is not None:
    scores = jnp.where((vocab == s.eos_id) & (emitted < s.min_new_tokens), -jnp.inf, scores)
  for forced, step in ((s.forced_bos_id, 0), (s.forced_eos_id, s.max_new_tokens - 1)):
    if forced is not None:
      scores = jnp.where(emitted == step, jnp.where(vocab == forced, 0.0, -jnp.inf), scores)
  return scores


def prefixed_history(prefilled: PrefilledModel, s: SearchSettings):
  """``(B, L)`` history (prefix, then ``pad_id`` slots for the new tokens) and its real-token flags."""
  batch = prefilled.prefix_ids.shape[0]
  history = jnp.concatenate(
    [prefilled.prefix_ids, jnp.full((batch, s.max_new_tokens), s.pad_id, jnp.int32)], axis=1
  )
  valid = jnp.concatenate(
    [prefilled.prefix_valid, jnp.ones((batch, s.max_new_tokens), jnp.bool_)], axis=1
  )
  return history, valid


def is_eos(tokens, s: SearchSettings):
  return jnp.zeros(tokens.shape, jnp.bool_) if s.eos_id is None else tokens == s.eos_id
