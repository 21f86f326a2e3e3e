"""Autoregressive decoding with a key/value cache, compiled once per batch shape and length.

    tokens = generate(gpt, params, prompt_ids, max_new_tokens=64, prompt_valid=valid, top_p=0.9, eos_id=50256,
                      rng=jax.random.key(0))                       # (B, 64)
    best = translate(transformer, params, src_ids, max_len=80, bos_id=1, eos_id=2, beam_size=4)  # (B, 80)

The prompt (GPT) or the start token (encoder-decoder) is prefilled in one pass into a fixed-size cache; then one token
per step runs inside a single ``lax.while_loop`` that stops once every row (or every beam set) is finished. Requests
are validated in Python before anything is traced; the settings are static, so each combination of settings, batch
shape and length compiles once.

Layout: ``R`` rows fed to the model (``B``, or ``B * W`` for ``W`` beams), ``P`` prefix tokens (the left-padded prompt,
or the start token), ``N`` new tokens, ``L = P + N`` history slots. Tokens after a row's end token are ``pad_id``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transformer_jax.models.common import token_validity
from transformer_jax.models.gpt import GPT
from transformer_jax.models.transformer import Transformer
from transformer_jax.validation import check_length, check_token_ids, is_concrete


class Beams(NamedTuple):
  """Finished hypotheses, best first."""

  tokens: jax.Array  # (B, W, N) int32, pad_id after the end token
  scores: jax.Array  # (B, W) float32: sum of log-probabilities / length ** length_penalty


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Static decoding settings: part of the compilation key."""

  max_new_tokens: int
  eos_id: int | None
  pad_id: int
  no_repeat_ngram_size: int
  sample: bool  # False: greedy
  top_k: int | None
  nucleus: bool  # top-p filtering on
  beam_size: int


class _Knobs(NamedTuple):
  """Float settings, traced: changing them does not recompile."""

  temperature: jax.Array
  top_p: jax.Array
  length_penalty: jax.Array


class _Problem(NamedTuple):
  """A prefilled model, ready to decode: what the search loops need and nothing model-specific."""

  first_logits: jax.Array  # (B, V) next-token logits after the prefix
  cache: Any  # the 'cache' collection; key/value leaves end in (B, S, H, K)
  rows: Any  # per-row constants the step needs, batch-major (beam search repeats them)
  step: Callable  # (cache, rows, tokens (R,), j) -> ((R, V) logits, cache): feeds generated token j
  prefix_ids: jax.Array  # (B, P)
  prefix_valid: jax.Array  # (B, P) bool


# ----------------------------------------------------------------------------------------------------------------------
# Public API


def generate(model: GPT, params, prompt_ids, *, max_new_tokens: int, prompt_valid=None, temperature: float | None = 1.0,
             top_k: int | None = None, top_p: float | None = None, no_repeat_ngram_size: int = 0,
             eos_id: int | None = None, pad_id: int = 0, rng=None):
  """Samples ``max_new_tokens`` continuations of left-padded prompts from a :class:`~transformer_jax.GPT`.

  Args:
    prompt_ids: ``(B, T)`` int ids, left-padded when prompts differ in length.
    prompt_valid: ``(B, T)``, True for real tokens (Hugging Face's ``attention_mask``); default from
      ``config.pad_id``, else every token is real. Padding must be on the left and every row needs a real token.
    temperature: ``None`` or 0 decodes greedily; otherwise logits are divided by it before ``top_k``, then ``top_p``.
    no_repeat_ngram_size: n > 0 never emits a token that would repeat an n-gram of the row (prompt included).
    eos_id: a row stops after emitting it; ``None``: rows never stop early.
    pad_id: fills the positions after a row's ``eos_id``.
    rng: a ``jax.random.key`` for sampling; ``None`` uses ``jax.random.key(0)``.

  Returns:
    ``(B, max_new_tokens)`` int32 new tokens (the prompt is not repeated).
  """
  prompt_ids, prompt_valid = _check_prompt(model, prompt_ids, prompt_valid, max_new_tokens)
  settings, knobs = _settings(model.config.vocab_size, max_new_tokens, eos_id, pad_id, no_repeat_ngram_size,
                              temperature=temperature, top_k=top_k, top_p=top_p)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, settings, params, knobs, prompt_ids, prompt_valid, rng)


def beam_search(model: GPT, params, prompt_ids, *, max_new_tokens: int, beam_size: int, length_penalty: float = 1.0,
                prompt_valid=None, no_repeat_ngram_size: int = 0, eos_id: int | None = None,
                pad_id: int = 0) -> Beams:
  """Beam search over continuations of left-padded prompts (arguments as in :func:`generate`).

  A hypothesis ends at ``eos_id`` or after ``max_new_tokens``; its score is its summed log-probability divided by
  (number of new tokens, ``eos_id`` included) ``** length_penalty``. Returns the ``beam_size`` best, best first.
  """
  prompt_ids, prompt_valid = _check_prompt(model, prompt_ids, prompt_valid, max_new_tokens)
  settings, knobs = _settings(model.config.vocab_size, max_new_tokens, eos_id, pad_id, no_repeat_ngram_size,
                              beam_size=beam_size, length_penalty=length_penalty)
  return _beam_search_gpt(model, settings, params, knobs, prompt_ids, prompt_valid)


def translate(model: Transformer, params, src_ids, *, max_len: int, bos_id: int, eos_id: int, beam_size: int = 1,
              length_penalty: float = 1.0, src_valid=None, no_repeat_ngram_size: int = 0, pad_id: int = 0):
  """Decodes ``(B, S)`` source ids with the encoder-decoder: greedy for ``beam_size=1``, beam search otherwise.

  Returns ``(B, max_len)`` int32 target tokens after ``bos_id`` (``eos_id`` included, then ``pad_id``). See
  :func:`translate_beams` for every beam and its score.
  """
  if beam_size == 1:
    settings, knobs, src_ids, src_valid = _check_translation(model, src_ids, src_valid, max_len, bos_id, eos_id,
                                                             pad_id, no_repeat_ngram_size)
    return _translate_greedy(model, settings, bos_id, params, knobs, src_ids, src_valid)
  return translate_beams(model, params, src_ids, max_len=max_len, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
                         length_penalty=length_penalty, src_valid=src_valid,
                         no_repeat_ngram_size=no_repeat_ngram_size, pad_id=pad_id).tokens[:, 0]


def translate_beams(model: Transformer, params, src_ids, *, max_len: int, bos_id: int, eos_id: int, beam_size: int,
                    length_penalty: float = 1.0, src_valid=None, no_repeat_ngram_size: int = 0,
                    pad_id: int = 0) -> Beams:
  """Beam search for the encoder-decoder (arguments as in :func:`translate`, scoring as in :func:`beam_search`)."""
  settings, knobs, src_ids, src_valid = _check_translation(model, src_ids, src_valid, max_len, bos_id, eos_id, pad_id,
                                                           no_repeat_ngram_size, beam_size, length_penalty)
  return _translate_beams(model, settings, bos_id, params, knobs, src_ids, src_valid)


# ----------------------------------------------------------------------------------------------------------------------
# Request checks (Python, before tracing)


def _host(x):
  """Concrete values as numpy (the checks below read them without a device round trip); tracers as they are."""
  return np.asarray(x) if is_concrete(x) else x


def _checked_ids(model, family: type, ids, vocab_field: str, name: str, instead: str):
  """Checks the model family and the ids' range; returns the ids (numpy when concrete)."""
  if not isinstance(model, family):
    raise TypeError(f'expected a {family.__name__} model, got {type(model).__name__} (use {instead})')
  ids = _host(ids)
  check_token_ids(ids, getattr(model.config, vocab_field), name)
  return ids


def _check_prompt(model, prompt_ids, prompt_valid, max_new_tokens):
  """Checks a GPT request's prompt; returns ``(B, T)`` int32 ids and bool validity."""
  cfg = model.config
  prompt_ids = _checked_ids(model, GPT, prompt_ids, 'vocab_size', 'prompt ids', 'translate for the encoder-decoder')
  _check_positive('max_new_tokens', max_new_tokens)
  valid = token_validity(prompt_ids, None if prompt_valid is None else _host(prompt_valid), cfg.pad_id, cfg.max_len,
                         'prompt')
  check_length(prompt_ids.shape[1] + max_new_tokens, cfg.max_len, 'prompt + max_new_tokens')
  if valid is None:
    return prompt_ids.astype(np.int32), np.ones(prompt_ids.shape, np.bool_)
  # A cache slot's position is fixed when it is written, so real tokens must be contiguous and end the prompt.
  if is_concrete(valid) and not (np.all(np.diff(valid.astype(np.int8), axis=1) >= 0) and np.all(valid[:, -1])):
    raise ValueError('prompts must be left-padded: in each row of prompt_valid, every padding entry (False) must come '
                     'before the real tokens, and every row needs at least one real token')
  return prompt_ids.astype(np.int32), valid


def _check_translation(model, src_ids, src_valid, max_len, bos_id, eos_id, pad_id, no_repeat_ngram_size,
                       beam_size=1, length_penalty=1.0):
  """Checks an encoder-decoder request; returns its settings, knobs, ``(B, S)`` int32 ids and bool validity."""
  cfg = model.config
  src_ids = _checked_ids(model, Transformer, src_ids, 'src_vocab_size', 'source ids', 'generate for GPT')
  _check_positive('max_len', max_len)
  check_length(max_len, cfg.max_len, 'target (the start token takes position 0)')
  _check_id('bos_id', bos_id, cfg.tgt_vocab_size)
  if eos_id is None:
    raise ValueError('translate needs an eos_id')
  settings, knobs = _settings(cfg.tgt_vocab_size, max_len, eos_id, pad_id, no_repeat_ngram_size, beam_size=beam_size,
                              length_penalty=length_penalty)
  valid = token_validity(src_ids, None if src_valid is None else _host(src_valid), cfg.pad_id, cfg.max_len, 'source')
  return settings, knobs, src_ids.astype(np.int32), np.ones(src_ids.shape, np.bool_) if valid is None else valid


def _settings(vocab_size: int, max_new_tokens: int, eos_id, pad_id, no_repeat_ngram_size, *, temperature=None,
              top_k=None, top_p=None, beam_size=1, length_penalty=1.0) -> tuple[_Settings, _Knobs]:
  """Checks the decoding settings and splits them into static ones and traced knobs."""
  if temperature is not None and not temperature >= 0:
    raise ValueError(f'temperature must be >= 0 (0 or None: greedy), got {temperature}')
  if top_k is not None:
    _check_positive('top_k', top_k)
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'top_p must lie in (0, 1], got {top_p}')
  if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
    raise ValueError(f'no_repeat_ngram_size must be a non-negative integer, got {no_repeat_ngram_size!r}')
  _check_positive('beam_size', beam_size)
  if eos_id is not None:
    _check_id('eos_id', eos_id, vocab_size)
  _check_id('pad_id', pad_id, vocab_size)
  settings = _Settings(max_new_tokens, eos_id, pad_id, no_repeat_ngram_size, sample=bool(temperature), top_k=top_k,
                       nucleus=top_p is not None and top_p < 1, beam_size=beam_size)
  as_float = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return settings, _Knobs(as_float(temperature or 1.0), as_float(top_p or 1.0), as_float(length_penalty))


def _check_positive(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}')


def _check_id(name: str, value, vocab_size: int) -> None:
  if not isinstance(value, (int, np.integer)) or not 0 <= value < vocab_size:
    raise ValueError(f'{name}={value!r} is outside the vocabulary [0, {vocab_size})')


# ----------------------------------------------------------------------------------------------------------------------
# Models -> prefilled problems (traced inside the jitted entry points)


def _empty_cache(model, params, method, *args, **kwargs):
  """Zeroed cache whose buffers have the length of the dummy input in ``args`` (shapes only: nothing runs)."""
  shapes = jax.eval_shape(lambda: model.apply({'params': params}, *args, method=method, mutable=['cache'],
                                              **kwargs)[1]['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _apply_step(model, params, cache, method, *args, **kwargs):
  """One cached call; returns the last position's ``(R, V)`` logits and the updated cache."""
  logits, variables = model.apply({'params': params, 'cache': cache}, *args, method=method, mutable=['cache'],
                                  **kwargs)
  return logits[:, -1], variables['cache']


def _gpt_problem(model: GPT, params, prompt_ids, prompt_valid, max_new_tokens: int) -> _Problem:
  """Prefills left-padded prompts into a cache of ``T + N - 1`` slots (the last new token is never fed)."""
  batch, prompt_len = prompt_ids.shape
  slots = prompt_len + max_new_tokens - 1
  positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)  # (B, T): real tokens count from 0
  cache_valid = jnp.concatenate([prompt_valid, jnp.ones((batch, max_new_tokens - 1), jnp.bool_)], axis=1)  # (B, S)
  dummy = jnp.zeros((batch, slots), jnp.int32)
  cache = _empty_cache(model, params, GPT.decode_step, dummy, positions=dummy, cache_valid=cache_valid)
  first_logits, cache = _apply_step(model, params, cache, GPT.decode_step, prompt_ids, positions=positions,
                                    cache_valid=cache_valid)

  def step(cache, rows, tokens, j):
    lengths, cache_valid = rows
    return _apply_step(model, params, cache, GPT.decode_step, tokens[:, None], positions=(lengths + j)[:, None],
                       cache_valid=cache_valid)

  rows = (prompt_valid.sum(axis=1), cache_valid)
  return _Problem(first_logits, cache, rows, step, prompt_ids, prompt_valid)


def _translation_problem(model: Transformer, params, src_ids, src_valid, max_len: int, bos_id: int) -> _Problem:
  """Encodes the source, caches its cross-attention keys/values and prefills the start token."""
  batch = src_ids.shape[0]
  memory = model.apply({'params': params}, src_ids, src_valid=src_valid, method=Transformer.encode)  # (B, S, D)
  bos = jnp.full((batch, 1), bos_id, jnp.int32)
  dummy = jnp.zeros((batch, max_len), jnp.int32)
  cache = _empty_cache(model, params, Transformer.decode_step, dummy, memory, positions=dummy, memory_valid=src_valid)
  first_logits, cache = _apply_step(model, params, cache, Transformer.decode_step, bos, memory,
                                    positions=jnp.zeros_like(bos), memory_valid=src_valid)

  def step(cache, memory_valid, tokens, j):
    positions = jnp.full((tokens.shape[0], 1), j + 1)  # the start token holds position 0
    return _apply_step(model, params, cache, Transformer.decode_step, tokens[:, None], None, positions=positions,
                       memory_valid=memory_valid)

  return _Problem(first_logits, cache, src_valid, step, bos, jnp.ones_like(bos, jnp.bool_))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(model, settings, params, knobs, prompt_ids, prompt_valid, rng):
  problem = _gpt_problem(model, params, prompt_ids, prompt_valid, settings.max_new_tokens)
  return _sample_loop(problem, settings, knobs, rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _beam_search_gpt(model, settings, params, knobs, prompt_ids, prompt_valid):
  return _beam_loop(_gpt_problem(model, params, prompt_ids, prompt_valid, settings.max_new_tokens), settings, knobs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _translate_greedy(model, settings, bos_id, params, knobs, src_ids, src_valid):
  problem = _translation_problem(model, params, src_ids, src_valid, settings.max_new_tokens, bos_id)
  return _sample_loop(problem, settings, knobs, jax.random.key(0))  # greedy: the key is never used


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _translate_beams(model, settings, bos_id, params, knobs, src_ids, src_valid):
  problem = _translation_problem(model, params, src_ids, src_valid, settings.max_new_tokens, bos_id)
  return _beam_loop(problem, settings, knobs)


# ----------------------------------------------------------------------------------------------------------------------
# Token choice


def _choose(logits, rng, s: _Settings, knobs: _Knobs):
  """``(R, V)`` float32 logits -> ``(R,)`` int32 tokens: greedy, or sampled after temperature, top-k and top-p."""
  if not s.sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / knobs.temperature
  if s.top_k is not None:
    kth = lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]  # (R, 1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.nucleus:
    logits = _nucleus(logits, knobs.top_p)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


def _nucleus(logits, top_p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches ``top_p``; the rest get ``-inf``."""
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # (R, V) descending
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)  # (R, 1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def _repeated_ngrams(history, valid, length, n: int, vocab_size: int):
  """``(R, V)`` True for tokens that would complete an n-gram already in ``history[:, :length]``.

  ``history``/``valid``: ``(R, L)`` tokens and real-token flags; ``length``: the slot the next token goes to. n-grams
  that touch padding do not count.
  """
  rows, slots = history.shape
  count = slots - n + 1
  windows = jnp.stack([history[:, i:i + count] for i in range(n)], axis=-1)  # (R, L-n+1, n)
  windows_real = jnp.stack([valid[:, i:i + count] for i in range(n)], axis=-1).all(-1)  # (R, L-n+1)
  # The last n-1 tokens written; a slice of a window array keeps its start traced but its size static.
  # The window starting n-1 slots back holds the last n-1 tokens, then the slot about to be written. Before n-1
  # tokens exist the clamped start reads garbage, but then no window is complete and nothing is banned.
  start = jnp.maximum(length - n + 1, 0)
  tail = lax.dynamic_slice_in_dim(windows, start, 1, axis=1)[:, 0, :-1]  # (R, n-1)
  tail_real = lax.dynamic_slice_in_dim(windows_real, start, 1, axis=1)  # (R, 1)
  ends_before = jnp.arange(count) + n - 1 < length  # (L-n+1,): windows already written in full
  hit = (windows[..., :-1] == tail[:, None]).all(-1) & windows_real & ends_before & tail_real  # (R, L-n+1)
  banned = jnp.zeros((rows, vocab_size), jnp.int32).at[jnp.arange(rows)[:, None], windows[..., -1]].add(hit)
  return banned > 0


def _block_repeats(logits, history, valid, length, s: _Settings):
  if not s.no_repeat_ngram_size:
    return logits
  banned = _repeated_ngrams(history, valid, length, s.no_repeat_ngram_size, logits.shape[-1])
  return jnp.where(banned, -jnp.inf, logits)


def _prefixed_history(problem: _Problem, s: _Settings):
  """``(B, L)`` history (prefix, then ``pad_id`` slots for the new tokens) and its real-token flags."""
  batch = problem.prefix_ids.shape[0]
  history = jnp.concatenate([problem.prefix_ids, jnp.full((batch, s.max_new_tokens), s.pad_id, jnp.int32)], axis=1)
  valid = jnp.concatenate([problem.prefix_valid, jnp.ones((batch, s.max_new_tokens), jnp.bool_)], axis=1)
  return history, valid


def _is_eos(tokens, s: _Settings):
  return jnp.zeros(tokens.shape, jnp.bool_) if s.eos_id is None else tokens == s.eos_id


# ----------------------------------------------------------------------------------------------------------------------
# Search loops: the first token comes from the prefill logits, then each iteration feeds the last one and picks the next


class _SampleState(NamedTuple):
  j: jax.Array  # () new tokens emitted so far
  history: jax.Array  # (B, L)
  finished: jax.Array  # (B,) emitted eos_id
  cache: Any
  rng: jax.Array


def _sample_loop(problem: _Problem, s: _Settings, knobs: _Knobs, rng):
  """Greedy or sampled decoding with per-row finishing -> ``(B, N)`` new tokens."""
  prefix_len = problem.prefix_ids.shape[1]
  history, valid = _prefixed_history(problem, s)

  def emit(state: _SampleState, logits) -> _SampleState:
    rng, key = jax.random.split(state.rng)
    slot = prefix_len + state.j
    logits = _block_repeats(logits, state.history, valid, slot, s)
    tokens = jnp.where(state.finished, s.pad_id, _choose(logits, key, s, knobs))  # (B,)
    history = lax.dynamic_update_slice_in_dim(state.history, tokens[:, None], slot, axis=1)
    return _SampleState(state.j + 1, history, state.finished | _is_eos(tokens, s), state.cache, rng)

  def body(state: _SampleState) -> _SampleState:
    fed = lax.dynamic_index_in_dim(state.history, prefix_len + state.j - 1, axis=1, keepdims=False)  # (B,)
    logits, cache = problem.step(state.cache, problem.rows, fed, state.j - 1)
    return emit(state._replace(cache=cache), logits)

  def going(state: _SampleState):
    return (state.j < s.max_new_tokens) & ~jnp.all(state.finished)

  batch = history.shape[0]
  state = emit(_SampleState(jnp.zeros((), jnp.int32), history, jnp.zeros(batch, jnp.bool_), problem.cache, rng),
               problem.first_logits)
  return lax.while_loop(going, body, state).history[:, prefix_len:]


class _BeamState(NamedTuple):
  j: jax.Array  # () new tokens emitted so far
  live: jax.Array  # (B, W, L) unfinished hypotheses
  live_logp: jax.Array  # (B, W) their summed log-probabilities, best first (-inf: empty)
  done: jax.Array  # (B, W, L) finished hypotheses
  done_score: jax.Array  # (B, W) their length-penalised scores, best first (-inf: empty)
  cache: Any  # rows ordered like `live`


def _beam_loop(problem: _Problem, s: _Settings, knobs: _Knobs) -> Beams:
  """Beam search with a length penalty -> the ``W`` best finished hypotheses per batch row."""
  width, n_new = s.beam_size, s.max_new_tokens
  prefix_len = problem.prefix_ids.shape[1]
  history, valid = _prefixed_history(problem, s)
  batch, slots = history.shape
  valid = jnp.repeat(valid, width, axis=0)  # (B*W, L)
  rows = jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), problem.rows)
  penalty = lambda length: jnp.asarray(length, jnp.float32) ** knobs.length_penalty  # noqa: E731

  def emit(state: _BeamState, logits) -> _BeamState:
    slot = prefix_len + state.j
    vocab = logits.shape[-1]
    flat_live = state.live.reshape(batch * width, slots)  # (B*W, L)
    logp = jax.nn.log_softmax(_block_repeats(logits, flat_live, valid, slot, s))
    totals = (state.live_logp[..., None] + logp.reshape(batch, width, vocab)).reshape(batch, width * vocab)
    # 2W candidates always leave W that do not end here, however many of them pick eos_id.
    cand_logp, cand = lax.top_k(totals, 2 * width)  # (B, 2W)
    parent, tokens = cand // vocab, (cand % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(state.live, parent[..., None], axis=1)  # (B, 2W, L)
    cand_seqs = lax.dynamic_update_slice_in_dim(cand_seqs, tokens[..., None], slot, axis=2)
    eos = _is_eos(tokens, s)
    # As in Hugging Face, an end token finishes a hypothesis only from the top W candidates: with W = 1 this is
    # greedy decoding.
    ends = (eos & (jnp.arange(2 * width) < width)) | (state.j == n_new - 1)
    done_score, done = _top(jnp.concatenate([state.done_score, jnp.where(ends, cand_logp / penalty(state.j + 1),
                                                                         -jnp.inf)], axis=1),
                            jnp.concatenate([state.done, cand_seqs], axis=1), width)
    live_logp, chosen = lax.top_k(jnp.where(eos | ends, -jnp.inf, cand_logp), width)  # (B, W)
    live = jnp.take_along_axis(cand_seqs, chosen[..., None], axis=1)
    source = (jnp.take_along_axis(parent, chosen, axis=1) + jnp.arange(batch)[:, None] * width).reshape(-1)
    cache = _map_cache_rows(lambda x, axis: jnp.take(x, source, axis=axis), state.cache, memory=False)
    return _BeamState(state.j + 1, live, live_logp, done, done_score, cache)

  def body(state: _BeamState) -> _BeamState:
    fed = state.live[:, :, prefix_len + state.j - 1].reshape(-1)  # (B*W,)
    logits, cache = problem.step(state.cache, rows, fed, state.j - 1)
    return emit(state._replace(cache=cache), logits)

  def going(state: _BeamState):
    # Log-probabilities only fall, so a live hypothesis can at best keep its sum and take the most favourable
    # length penalty still reachable (a monotone penalty peaks at one end of the range).
    best_live = state.live_logp[:, 0]
    bound = jnp.maximum(best_live / penalty(state.j + 1), best_live / penalty(n_new))
    settled = state.done_score[:, -1] >= bound
    return (state.j < n_new) & ~jnp.all(settled)

  live = jnp.repeat(history[:, None], width, axis=1)  # (B, W, L)
  first_only = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)  # identical copies: keep one until they differ
  state = _BeamState(jnp.zeros((), jnp.int32), live, jnp.broadcast_to(first_only, (batch, width)), live,
                     jnp.full((batch, width), -jnp.inf), _map_cache_rows(
                         lambda x, axis: jnp.repeat(x, width, axis=axis), problem.cache))
  state = emit(state, jnp.repeat(problem.first_logits, width, axis=0))
  final = lax.while_loop(going, body, state)
  return Beams(final.done[:, :, prefix_len:], final.done_score)


def _top(scores, seqs, k: int):
  """The ``k`` best of ``(B, C)`` scores and their ``(B, C, L)`` sequences, best first."""
  best, index = lax.top_k(scores, k)
  return best, jnp.take_along_axis(seqs, index[..., None], axis=1)


MEMORY_LEAVES = ('memory_key', 'memory_value')  # cross-attention's projected encoder output


def _map_cache_rows(fn, cache, *, memory: bool = True):
  """Applies ``fn(leaf, batch_axis)`` to each key/value buffer: they all end in ``(B, S, H, K)`` (scan adds a leading
  ``L``). Cache indices (``()`` or ``(L,)``) are shared by all rows and stay as they are. ``memory=False`` leaves
  the cross-attention memory alone: all beams of a source hold the same one, so reordering beams cannot change it."""
  def leaf(path, x):
    if x.ndim < 4 or (not memory and getattr(path[-1], 'key', None) in MEMORY_LEAVES):
      return x
    return fn(x, x.ndim - 4)
  return jax.tree_util.tree_map_with_path(leaf, cache)
