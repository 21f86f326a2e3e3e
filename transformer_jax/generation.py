"""Autoregressive decoding with a key/value cache, compiled once per batch shape and length.

    tokens = generate(gpt, params, prompt_ids, max_new_tokens=64, prompt_valid=valid, top_p=0.9, eos_id=50256,
                      rng=jax.random.key(0))                       # (B, 64)
    best = translate(transformer, params, src_ids, max_len=80, bos_id=1, eos_id=2, beam_size=4)  # (B, 80)

The prompt (GPT) or the start token (encoder-decoder) is prefilled in one pass into a fixed-size cache; then one token
per step runs inside a single ``lax.while_loop`` that stops once every row (or every beam set) is finished. Requests
are validated in Python before anything is traced; the settings are static, so each combination of settings, batch
shape and length compiles once.

This file holds the public functions and their request checks; :mod:`transformer_jax.prefill` puts a model's prefix
in its cache and :mod:`transformer_jax.search` holds the compiled loops.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from transformer_jax.decoding import (
  compiled_beam_search_gpt,
  compiled_generate,
  compiled_translate_beams,
  compiled_translate_greedy,
)
from transformer_jax.models.gpt import GPT
from transformer_jax.models.transformer import Transformer
from transformer_jax.search import Beams
from transformer_jax.search_settings import (
  FloatSettings,
  SearchSettings,
  check_id,
  check_positive,
  make_settings,
)
from transformer_jax.validation import check_length, check_token_ids, is_concrete, token_validity

__all__ = ['Beams', 'beam_search', 'generate', 'translate', 'translate_beams']


# ----------------------------------------------------------------------------------------------------------------------
# Public API


def generate(
  model: GPT,
  params,
  prompt_ids,
  *,
  max_new_tokens: int,
  prompt_valid=None,
  temperature: float | None = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  no_repeat_ngram_size: int = 0,
  eos_id: int | None = None,
  pad_id: int = 0,
  rng=None,
  **constraints,
):
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
    constraints: :data:`CONSTRAINTS`, Hugging Face's ``min_new_tokens``, ``bad_words_ids`` and
      ``forced_eos_token_id``.

  Returns:
    ``(B, max_new_tokens)`` int32 new tokens (the prompt is not repeated).
  """
  prompt_ids, prompt_valid = _check_prompt(model, prompt_ids, prompt_valid, max_new_tokens)
  stopping = (eos_id, pad_id, no_repeat_ngram_size)
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  settings, floats = make_settings(
    model.config.vocab_size, max_new_tokens, *stopping, **sampling, **_gpt(constraints)
  )
  rng = jax.random.key(0) if rng is None else rng
  return compiled_generate(model, settings, params, floats, prompt_ids, prompt_valid, rng)


def beam_search(
  model: GPT,
  params,
  prompt_ids,
  *,
  max_new_tokens: int,
  beam_size: int,
  length_penalty: float = 1.0,
  prompt_valid=None,
  no_repeat_ngram_size: int = 0,
  eos_id: int | None = None,
  pad_id: int = 0,
  early_stopping: bool | str = 'never',
  **constraints,
) -> Beams:
  """Beam search over continuations of left-padded prompts (arguments as in :func:`generate`).

  A hypothesis ends at ``eos_id`` or after ``max_new_tokens``; its score is its summed log-probability divided by
  (number of new tokens, ``eos_id`` included) ``** length_penalty``. Returns the ``beam_size`` best, best first.
  The search is Hugging Face's step for step; ``early_stopping`` is its option (True, False, or ``'never'``: stop
  only when no live hypothesis can win, the exhaustive default).
  """
  prompt_ids, prompt_valid = _check_prompt(model, prompt_ids, prompt_valid, max_new_tokens)
  scoring = dict(
    beam_size=beam_size,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    **_gpt(constraints),
  )
  stopping = (eos_id, pad_id, no_repeat_ngram_size)
  settings, floats = make_settings(model.config.vocab_size, max_new_tokens, *stopping, **scoring)
  return compiled_beam_search_gpt(model, settings, params, floats, prompt_ids, prompt_valid)


def translate(
  model: Transformer,
  params,
  src_ids,
  *,
  max_len: int,
  bos_id: int,
  eos_id: int,
  beam_size: int = 1,
  length_penalty: float = 1.0,
  src_valid=None,
  no_repeat_ngram_size: int = 0,
  pad_id: int = 0,
  early_stopping: bool | str = 'never',
  **constraints,
):
  """Decodes ``(B, S)`` source ids with the encoder-decoder: greedy for ``beam_size=1``, beam search otherwise.

  ``bos_id`` is the decoder's start token (Hugging Face's ``decoder_start_token_id``). ``constraints``:
  :data:`CONSTRAINTS` (``forced_bos_id`` forces the first new token). ``early_stopping``: as in :func:`beam_search`.
  :func:`transformer_jax.generation_config.translate_options` reads them all from a ``generation_config.json``.

  Returns ``(B, max_len)`` int32 target tokens after ``bos_id`` (``eos_id`` included, then ``pad_id``). See
  :func:`translate_beams` for every beam and its score.
  """
  target = (max_len, bos_id, eos_id, pad_id)
  search = (no_repeat_ngram_size, beam_size, length_penalty, early_stopping)
  request = _check_translation(model, src_ids, src_valid, *target, *search, **constraints)
  if beam_size == 1:
    return compiled_translate_greedy(model, request.settings, bos_id, params, *request[1:])
  return compiled_translate_beams(model, request.settings, bos_id, params, *request[1:]).tokens[
    :, 0
  ]


def translate_beams(model: Transformer, params, src_ids, *, beam_size: int, **options) -> Beams:
  """Beam search for the encoder-decoder: every beam and its score, best first (scoring as in :func:`beam_search`).

  ``options``: the other keyword arguments of :func:`translate`; ``max_len``, ``bos_id`` and ``eos_id`` are required.
  """
  request = _check_translation(model, src_ids, beam_size=beam_size, **options)
  return compiled_translate_beams(model, request.settings, options['bos_id'], params, *request[1:])


# ----------------------------------------------------------------------------------------------------------------------
# Request checks (Python, before tracing)


# Keyword arguments every search takes besides its own (see `SearchSettings`); GPT has no forced first token.
CONSTRAINTS = ('min_new_tokens', 'bad_words_ids', 'forced_bos_id', 'forced_eos_id')


def _known(constraints: dict, names) -> dict:
  unknown = sorted(set(constraints) - set(names))
  if unknown:
    raise TypeError(f'unexpected keyword arguments {unknown}; the constraints are {list(names)}')
  return constraints


def _gpt(constraints: dict) -> dict:
  return _known(constraints, [c for c in CONSTRAINTS if c != 'forced_bos_id'])


def _host(x):
  """Concrete values as numpy (the checks below read them without a device round trip); tracers as they are."""
  return np.asarray(x) if is_concrete(x) else x


def _checked_ids(model, family: type, ids, vocab_field: str, name: str, instead: str):
  """Checks the model family and the ids' range; returns the ids (numpy when concrete)."""
  if not isinstance(model, family):
    raise TypeError(
      f'expected a {family.__name__} model, got {type(model).__name__} (use {instead})'
    )
  ids = _host(ids)
  check_token_ids(ids, getattr(model.config, vocab_field), name)
  return ids


def _check_prompt(model, prompt_ids, prompt_valid, max_new_tokens):
  """Checks a GPT request's prompt; returns ``(B, T)`` int32 ids and bool validity."""
  cfg = model.config
  prompt_ids = _checked_ids(
    model, GPT, prompt_ids, 'vocab_size', 'prompt ids', 'translate for the encoder-decoder'
  )
  check_positive('max_new_tokens', max_new_tokens)
  valid = token_validity(
    prompt_ids,
    None if prompt_valid is None else _host(prompt_valid),
    cfg.pad_id,
    cfg.max_len,
    'prompt',
  )
  check_length(prompt_ids.shape[1] + max_new_tokens, cfg.max_len, 'prompt + max_new_tokens')
  if valid is None:
    return prompt_ids.astype(np.int32), np.ones(prompt_ids.shape, np.bool_)
  # A cache slot's position is fixed when it is written, so real tokens must be contiguous and end the prompt.
  if is_concrete(valid) and not (
    np.all(np.diff(valid.astype(np.int8), axis=1) >= 0) and np.all(valid[:, -1])
  ):
    raise ValueError(
      'prompts must be left-padded: in each row of prompt_valid, every padding entry (False) must come '
      'before the real tokens, and every row needs at least one real token'
    )
  return prompt_ids.astype(np.int32), valid


class _Translation(NamedTuple):
  """A checked encoder-decoder request, in the order the compiled programs take it (after the model, settings and
  start token, which are static, and the params)."""

  settings: SearchSettings
  floats: FloatSettings
  src_ids: np.ndarray  # (B, S) int32
  src_valid: np.ndarray  # (B, S) bool


def _check_translation(
  model,
  src_ids,
  src_valid=None,
  max_len=None,
  bos_id=None,
  eos_id=None,
  pad_id=0,
  no_repeat_ngram_size=0,
  beam_size=1,
  length_penalty=1.0,
  early_stopping='never',
  **constraints,
) -> _Translation:
  """Checks an encoder-decoder request (the arguments of :func:`translate`)."""
  cfg = model.config
  src_ids = _checked_ids(
    model, Transformer, src_ids, 'src_vocab_size', 'source ids', 'generate for GPT'
  )
  for name, value in (('max_len', max_len), ('bos_id', bos_id), ('eos_id', eos_id)):
    if value is None:
      raise ValueError(f'translate needs {name}')
  check_positive('max_len', max_len)
  check_length(max_len, cfg.max_len, 'target (the start token takes position 0)')
  check_id('bos_id', bos_id, cfg.tgt_vocab_size)
  settings, floats = make_settings(
    cfg.tgt_vocab_size,
    max_len,
    eos_id,
    pad_id,
    no_repeat_ngram_size,
    beam_size=beam_size,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    **_known(constraints, CONSTRAINTS),
  )
  valid = token_validity(
    src_ids, None if src_valid is None else _host(src_valid), cfg.pad_id, cfg.max_len, 'source'
  )
  valid = np.ones(src_ids.shape, np.bool_) if valid is None else valid
  return _Translation(settings, floats, src_ids.astype(np.int32), valid)
