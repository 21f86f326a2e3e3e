"""An encoder-decoder checkpoint (BART, Marian, T5) as one object that turns texts into texts.

    from transformer_jax import pretrained
    opus = pretrained.load('path/to/opus-mt-en-de')          # config.json, model.safetensors, tokenizer files
    opus.translate(['A small test.', 'Another, longer sentence.'], num_beams=4)
    t5 = pretrained.load('path/to/t5-small')
    t5.translate('A small test.', task='translation_en_to_de')   # its prefix and settings from config.json
    t5.summarize(['A long article ...'])

Each call decodes as ``model.generate`` does with the checkpoint's ``generation_config.json`` (through
:func:`~transformer_jax.generation_config.translate_options`), the keyword arguments ``generate`` takes on top, and
decodes the new tokens with the target tokenizer: what transformers 4's ``'translation'``, ``'summarization'`` and
``'text2text-generation'`` pipelines returned (transformers 5 removed them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from transformer_jax import generation
from transformer_jax.convert.hf_directory import save_hf
from transformer_jax.generation_config import translate_options
from transformer_jax.models import Transformer
from transformer_jax.tokenizer import Tokenizer

# config.json keys that decoding reads (start, end and forced tokens, the prefix and settings of each task, the
# positions that cap generate's default length), kept when the model is saved again.
KEPT_KEYS = (
  'bos_token_id',
  'eos_token_id',
  'pad_token_id',
  'decoder_start_token_id',
  'forced_bos_token_id',
  'forced_eos_token_id',
  'prefix',
  'task_specific_params',
  'max_position_embeddings',
)


@dataclasses.dataclass
class Seq2SeqPretrained:
  """A :class:`~transformer_jax.Transformer`, its params, its source tokenizer (``tokenizer.for_targets()`` decodes
  its outputs), the checkpoint's ``generation_config.json`` and what its ``config.json`` says beyond the
  architecture (``hf_config``: :data:`KEPT_KEYS`)."""

  model: Transformer
  params: Any
  tokenizer: Tokenizer
  generation_config: dict = dataclasses.field(default_factory=dict)
  hf_config: dict = dataclasses.field(default_factory=dict)
  # A generator has no class names; the attribute answers as a classifier's `Pretrained.labels` does.
  labels = None

  @property
  def tasks(self) -> dict:
    """The checkpoint's ``task_specific_params``: task name -> its prefix and generation settings."""
    return self.hf_config.get('task_specific_params') or {}

  def translate(
    self, texts: str | Sequence[str], *, task: str | None = None, **options
  ) -> str | list[str]:
    """Decodes each text into its translation (or summary, or answer: whatever the model was trained to write).

    ``task``: a key of :attr:`tasks` (``'translation_en_to_de'``) whose prefix goes before each text and whose
    settings go over the generation config. ``options``: ``generate``'s keyword arguments (``num_beams=4``,
    ``max_new_tokens=50``, ``no_repeat_ngram_size=3``...), over both. As in ``generate``, 20 new tokens at most
    when none of them sets a length. The texts are padded into one batch for you.

    Returns one text per input text (the text itself for a single string).
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    prefix, search = self._search(task, options)
    batch = self.tokenizer([prefix + text for text in texts], padding='longest')
    valid = batch['attention_mask'].astype(bool)
    tokens = generation.translate(
      self.model, self.params, batch['input_ids'], src_valid=valid, **search
    )
    eos = search['eos_id']
    rows = [row[: row.index(eos) + 1] if eos in row else row for row in np.asarray(tokens).tolist()]
    out = self.tokenizer.for_targets().batch_decode(rows, skip_special_tokens=True)
    return out[0] if single else out

  def _search(self, task: str | None, options: dict) -> tuple[str, dict]:
    """The prefix of `task` and translate's keyword arguments: the generation config, the task's settings over it
    and `options` over both."""
    if task is not None and task not in self.tasks:
      raise ValueError(f'task {task!r} is not in this checkpoint; its tasks: {sorted(self.tasks)}')
    settings = dict(self.tasks.get(task) or {})
    prefix = settings.pop('prefix', None) or self.hf_config.get('prefix') or ''
    return prefix, translate_options(
      {**self.generation_config, **settings, **options}, self.hf_config
    )

  def summarize(self, texts: str | Sequence[str], **options) -> str | list[str]:
    """:meth:`translate` with the checkpoint's ``'summarization'`` task (T5's ``'summarize: '`` prefix and its
    settings) when it has one, else with the generation config alone."""
    task = 'summarization' if 'summarization' in self.tasks else None
    return self.translate(texts, task=task, **options)

  def save(self, path: str | os.PathLike) -> None:
    """Writes a directory that ``transformers``' ``from_pretrained`` and ``AutoTokenizer`` load and that decodes
    alike: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files."""
    path = Path(path)
    save_hf(self.model, self.params, path)
    config = {**self.hf_config, **json.loads((path / 'config.json').read_text())}
    (path / 'config.json').write_text(json.dumps(config, indent=2))
    (path / 'generation_config.json').write_text(json.dumps(self.generation_config, indent=2))
    self.tokenizer.save(path)
