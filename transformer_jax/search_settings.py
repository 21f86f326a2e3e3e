"""Decoding settings: the static ones (part of the compilation key) and the traced floats, checked once."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  """Static decoding settings: part of the compilation key."""

  max_new_tokens: int
  eos_id: int | None
  pad_id: int
  no_repeat_ngram_size: int
  sample: bool  # False: greedy
  top_k: int | None
  nucleus: bool  # top-p filtering on
  beam_size: int
  min_new_tokens: int = 0  # eos_id is banned before this many new tokens
  bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never completed
  forced_bos_id: int | None = None  # the first new token (mBART's target language)
  forced_eos_id: int | None = None  # the last new token when no row ended before
  # Beam search, as Hugging Face's: True stops a row at W finished hypotheses; False once the best live one, scored at
  # its current length, cannot beat the worst finished; 'never' once it cannot at any reachable length.
  early_stopping: bool | str = 'never'


class FloatSettings(NamedTuple):
  """Float settings, traced: changing them does not recompile."""

  temperature: jax.Array
  top_p: jax.Array
  length_penalty: jax.Array


def make_settings(
  vocab_size: int,
  max_new_tokens: int,
  eos_id,
  pad_id,
  no_repeat_ngram_size,
  *,
  temperature=None,
  top_k=None,
  top_p=None,
  beam_size=1,
  length_penalty=1.0,
  min_new_tokens=0,
  bad_words_ids=None,
  forced_bos_id=None,
  forced_eos_id=None,
  early_stopping='never',
) -> tuple[SearchSettings, FloatSettings]:
  """Checks the decoding settings and splits them into static ones and traced floats."""
  if temperature is not None and not temperature >= 0:
    raise ValueError(f'temperature must be >= 0 (0 or None: greedy), got {temperature}')
  if top_k is not None:
    check_positive('top_k', top_k)
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'top_p must lie in (0, 1], got {top_p}')
  if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
    raise ValueError(
      f'no_repeat_ngram_size must be a non-negative integer, got {no_repeat_ngram_size!r}'
    )
  check_positive('beam_size', beam_size)
  if eos_id is not None:
    check_id('eos_id', eos_id, vocab_size)
  check_id('pad_id', pad_id, vocab_size)
  if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(
      f'min_new_tokens must be an integer in [0, {max_new_tokens}] (max new tokens), got '
      f'{min_new_tokens!r}'
    )
  for name, value in (('forced_bos_id', forced_bos_id), ('forced_eos_id', forced_eos_id)):
    if value is not None:
      check_id(name, value, vocab_size)
  if early_stopping not in (True, False, 'never'):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  settings = SearchSettings(
    max_new_tokens,
    eos_id,
    pad_id,
    no_repeat_ngram_size,
    sample=bool(temperature),
    top_k=top_k,
    nucleus=top_p is not None and top_p < 1,
    beam_size=beam_size,
    min_new_tokens=min_new_tokens,
    bad_words=_bad_words(bad_words_ids, eos_id, vocab_size),
    forced_bos_id=forced_bos_id,
    forced_eos_id=forced_eos_id,
    early_stopping=early_stopping,
  )
  as_float = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return settings, FloatSettings(
    as_float(temperature or 1.0), as_float(top_p or 1.0), as_float(length_penalty)
  )


def _bad_words(bad_words_ids, eos_id, vocab_size: int) -> tuple[tuple[int, ...], ...]:
  """Checked ``bad_words_ids`` as a hashable tuple; the end token alone is dropped, as Hugging Face does."""
  words = []
  for word in bad_words_ids or ():
    word = tuple(int(t) for t in word)
    if not word or not all(0 <= t < vocab_size for t in word):
      raise ValueError(
        f'bad_words_ids must be non-empty lists of ids in [0, {vocab_size}), got {list(word)}'
      )
    if word != (eos_id,):
      words.append(word)
  return tuple(words)


def check_positive(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}')


def check_id(name: str, value, vocab_size: int) -> None:
  if not isinstance(value, (int, np.integer)) or not 0 <= value < vocab_size:
    raise ValueError(f'{name}={value!r} is outside the vocabulary [0, {vocab_size})')
