"""Hugging Face ``generation_config.json`` (or ``generate`` keyword arguments) -> the keyword arguments of
:func:`~transformer_jax.generation.translate`, so that a checkpoint decodes the way it ships.

    options = translate_options(read_generation_config('path/to/opus-mt-en-de'))
    tokens = translate(model, params, src_ids, src_valid=valid, **options)

Lengths: Hugging Face's ``max_length`` and ``min_length`` count the decoder's start token, ours count new tokens
only, so they become ``max_len = max_length - 1`` and ``min_new_tokens = min_length - 1``; ``max_new_tokens`` and
``min_new_tokens`` win when given, and without any length ``generate`` makes 20 new tokens (fewer when the
``model_config``'s ``max_position_embeddings`` end sooner), as here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# What generate() assumes for a key the file leaves out (GenerationConfig's defaults).
HF_DEFAULTS = {
  'max_length': 20,
  'min_length': 0,
  'num_beams': 1,
  'length_penalty': 1.0,
  'early_stopping': False,
  'no_repeat_ngram_size': 0,
}
# Keys that change what generate() returns and that translate() does not implement; refused, not ignored.
_UNSUPPORTED = {
  'do_sample': (False, None),
  'num_beam_groups': (1, None),
  'repetition_penalty': (1.0, None),
  'encoder_no_repeat_ngram_size': (0, None),
  'begin_suppress_tokens': (None, []),
  'suppress_tokens': (None, []),
  'num_return_sequences': (1, None),
}


# Every key translate_options reads (a config.json's other keys are not generation settings).
GENERATION_KEYS = (
  *HF_DEFAULTS,
  *_UNSUPPORTED,
  'max_new_tokens',
  'min_new_tokens',
  'decoder_start_token_id',
  'eos_token_id',
  'pad_token_id',
  'bad_words_ids',
  'forced_bos_token_id',
  'forced_eos_token_id',
)


def read_generation_config(path: str | os.PathLike) -> dict:
  """The ``generation_config.json`` of a model directory as a dict; ``{}`` when there is none."""
  file = Path(path) / 'generation_config.json'
  if not file.is_file():
    return {}
  try:
    return json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{file} is not valid JSON: {e}') from e


def _single(name: str, value):
  """One id from a value that may be a list of them (``eos_token_id: [2]``)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 1:
      raise ValueError(f'{name}={value}: translate takes one id here')
    return value[0]
  return value


def translate_options(hf: dict, model_config: dict | None = None, **overrides) -> dict:
  """Generation settings (a ``generation_config.json`` dict, or ``generate`` keyword arguments) -> ``translate``'s.

  ``model_config``: the ``config.json`` dict, for the ids the generation config leaves out (older checkpoints keep
  them there). ``overrides``: ``generate``-style keywords (``num_beams=4``...) applied over ``hf``.
  """
  settings = {**(model_config or {}), **hf, **overrides}
  bad = [
    f'{k}={settings[k]!r}'
    for k, ok in _UNSUPPORTED.items()
    if k in settings and settings[k] not in ok
  ]
  if bad:
    raise ValueError('unsupported generation settings: ' + ', '.join(bad))
  get = lambda key: settings.get(key, HF_DEFAULTS.get(key))  # noqa: E731
  for needed in ('decoder_start_token_id', 'eos_token_id'):
    if get(needed) is None:
      raise ValueError(f'the generation settings lack {needed}')
  # generate() reads a given max_length as the whole length, and one left at its default as 20 new tokens, fewer if
  # the model's positions end sooner
  max_new = get('max_new_tokens')
  if max_new is None and settings.get('max_length') is not None:
    max_new = settings['max_length'] - 1
  elif max_new is None:
    positions = settings.get('max_position_embeddings') or HF_DEFAULTS['max_length'] + 1
    max_new = min(HF_DEFAULTS['max_length'], positions - 1)
  min_new = get('min_new_tokens')
  min_new = max(get('min_length') - 1, 0) if min_new is None else min_new
  eos = _single('eos_token_id', get('eos_token_id'))
  pad = get('pad_token_id')
  return dict(
    max_len=max_new,
    bos_id=get('decoder_start_token_id'),
    eos_id=eos,
    pad_id=eos if pad is None else pad,
    beam_size=get('num_beams'),
    length_penalty=float(get('length_penalty')),
    early_stopping=get('early_stopping'),
    no_repeat_ngram_size=get('no_repeat_ngram_size'),
    min_new_tokens=min(min_new, max_new),
    bad_words_ids=get('bad_words_ids'),
    forced_bos_id=get('forced_bos_token_id'),
    forced_eos_id=_single('forced_eos_token_id', get('forced_eos_token_id')),
  )
