"""A Hugging Face checkpoint as one object: model, params, tokenizer and config, with the jobs people load one for.

    from transformer_jax import pretrained
    gpt2 = pretrained.load('path/to/gpt2')                  # config.json, model.safetensors, tokenizer files
    gpt2.generate_text(['Hello, my dog', 'The'], max_new_tokens=20, temperature=0.7, top_p=0.9)
    llama = pretrained.load('path/to/llama')                # Llama, Mistral, Qwen2 too (a GPT with their blocks)
    bert = pretrained.load('path/to/sst2-bert')
    bert.classify(['a wonderful film'])                     # [{'label': 'POSITIVE', 'score': 0.998}]
    bert.save('out/')                                       # transformers' from_pretrained and AutoTokenizer load it
    opus = pretrained.load('path/to/opus-mt-en-de')         # BART, Marian, T5: see transformer_jax.pretrained_seq2seq
    opus.translate(['A small test.'], num_beams=4)

Each method takes what the matching ``transformers.pipeline`` takes and returns what it returns: ``generate_text``
(``'text-generation'``), ``classify`` (``'text-classification'``), ``fill_mask`` (``'fill-mask'``), and ``embed``
(sentence-transformers' mean pooling).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from transformer_jax.convert.hf_directory import load_hf, read_config, save_hf
from transformer_jax.convert.rules import ConversionError
from transformer_jax.generation import beam_search, generate
from transformer_jax.generation_config import read_generation_config
from transformer_jax.models import (
  BERT,
  GPT,
  BERTForMaskedLM,
  BERTForSequenceClassification,
  EncoderModel,
  Transformer,
)
from transformer_jax.pretrained_seq2seq import KEPT_KEYS, Seq2SeqPretrained
from transformer_jax.tokenizer import Tokenizer, load_tokenizer

# config.json keys that describe the checkpoint rather than the architecture, kept when the model is saved again.
_KEPT_KEYS = (
  'bos_token_id',
  'eos_token_id',
  'pad_token_id',
  'task_specific_params',
  'problem_type',
)


def load(
  path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, dtype=None
) -> Pretrained | Seq2SeqPretrained:
  """Loads a Hugging Face model directory (GPT-2, Llama, Mistral, Qwen2, BERT; BART, Marian, T5 as a
  :class:`Seq2SeqPretrained`) and its tokenizer, as ``AutoTokenizer`` reads it (Llama 2's ``LlamaTokenizer``, Llama
  3's ``PreTrainedTokenizerFast``, ``Qwen2Tokenizer``: see :mod:`transformer_jax.tokenizer_families`).

  ``tokenizer``: another directory to read the tokenizer from (default: ``path``). ``dtype``: the params' dtype
  (default: the checkpoint's). Raises :class:`~transformer_jax.convert.ConversionError` or
  :class:`~transformer_jax.tokenizer.TokenizerError` with one line saying what is wrong.
  """
  path = Path(path)
  config = read_config(path)
  tok = load_tokenizer(path if tokenizer is None else tokenizer)
  model, params = load_hf(path, dtype=dtype)
  if isinstance(model, EncoderModel):
    raise ConversionError(
      f'{path} holds an encoder alone (T5EncoderModel), which pretrained has no job for; use convert.load_hf'
    )
  seq2seq = isinstance(model, Transformer)
  if seq2seq:  # Marian's sides may have vocabularies of their own
    sides = [('source tokenizer', tok, model.config.src_vocab_size)]
    sides += [('target tokenizer', tok.for_targets(), model.config.tgt_vocab_size)]
  else:
    sides = [('tokenizer', tok, model.config.vocab_size)]
  for name, side, rows in sides:
    if side.vocab_size > rows:
      raise ConversionError(
        f'the {name} has {side.vocab_size} tokens but the model embeds only {rows}: they do not belong together'
      )
  if seq2seq:
    kept = {k: config[k] for k in KEPT_KEYS if k in config}
    return Seq2SeqPretrained(model, params, tok, read_generation_config(path), kept)
  labels = None
  if isinstance(model, BERTForSequenceClassification):
    names = config.get('id2label') or {}
    labels = tuple(names.get(str(i), f'LABEL_{i}') for i in range(model.config.num_labels))
  return Pretrained(model, params, tok, {k: config[k] for k in _KEPT_KEYS if k in config}, labels)


@dataclasses.dataclass
class Pretrained:
  """A model, its params and tokenizer: a :class:`~transformer_jax.GPT` (GPT-2, Llama, Mistral, Qwen2) or one of the
  BERT classes. ``labels``: the class names of a classifier (``id2label``), else ``None``; ``hf_config``: what the
  checkpoint's ``config.json`` says beyond the architecture (special token ids)."""

  model: nn.Module
  params: Any
  tokenizer: Tokenizer
  hf_config: dict = dataclasses.field(default_factory=dict)
  labels: tuple[str, ...] | None = None

  # --------------------------------------------------------------------------------------------------------------------
  # GPT

  def generate_text(
    self,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    rng=None,
    return_full_text: bool = True,
  ) -> list[str]:
    """Continues each prompt; greedy by default (``temperature=None``), else sampled with ``temperature``, ``top_k``
    and ``top_p`` as in :func:`~transformer_jax.generate`, or beam search with ``num_beams > 1`` (``early_stopping``
    as ``generate``'s, whose default is False). Prompts of different lengths are left-padded for you, with the
    tokenizer's padding token, else the end token (Llama checkpoints have no padding token). A row stops at the end
    token of ``config.json``, else the tokenizer's; greedy and sampled rows at any of a list of them (Llama 3.1's),
    beams at one.

    Returns one text per prompt: the prompt and its continuation (``return_full_text``), or the continuation alone,
    as decoded after the prompt (what ``generate`` and ``batch_decode`` give). transformers 5's pipeline decodes the
    continuation alone, which for a Metaspace tokenizer (Llama 2, Mistral) drops the space it may start with.
    """
    self._require(GPT, 'generate_text')
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    ends = self._special('eos_token_id', self.tokenizer.eos_id)
    ends = list(ends) if isinstance(ends, (list, tuple)) else [] if ends is None else [ends]
    if num_beams > 1 and len(ends) > 1:
      raise ValueError(f'beam search stops at one end token; config.json has eos_token_id={ends}')
    # A row stops at the first end token; one that emits another is cut there below, its later tokens unchanged.
    eos = ends[0] if ends else None
    pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (eos or 0)
    batch = self.tokenizer(prompts, padding='longest', padding_side='left', pad_id=pad)
    ids, valid = batch['input_ids'], batch['attention_mask'].astype(bool)
    stopping = dict(eos_id=eos, pad_id=pad, no_repeat_ngram_size=no_repeat_ngram_size)
    options = dict(max_new_tokens=max_new_tokens, prompt_valid=valid, **stopping)
    if num_beams > 1:
      scoring = dict(
        beam_size=num_beams, length_penalty=length_penalty, early_stopping=early_stopping
      )
      new = beam_search(self.model, self.params, ids, **options, **scoring).tokens[:, 0]
    else:
      sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
      new = generate(self.model, self.params, ids, **options, **sampling)
    texts = []
    for prompt, prompt_row, real, row in zip(
      prompts, ids.tolist(), valid, np.asarray(new).tolist()
    ):
      row = row[: next((i + 1 for i, t in enumerate(row) if t in ends), len(row))]
      # Decode prompt and continuation together (a character may span the two, and the continuation's first space
      # is no leading space), then cut the decoded prompt off.
      prompt_row = [t for t, keep in zip(prompt_row, real) if keep]
      full, start = self.tokenizer.decode(prompt_row + row), self.tokenizer.decode(prompt_row)
      texts.append(prompt + full[len(start) :] if return_full_text else full[len(start) :])
    return texts[0] if single else texts

  # --------------------------------------------------------------------------------------------------------------------
  # BERT

  def classify(self, texts, pairs=None, *, top_k: int | None = 1):
    """Class probabilities (softmax over the labels) of each text, or text pair: ``[{'label', 'score'}]``, the
    ``top_k`` most probable labels best first (``None``: every label). One text gives its list; with ``top_k=1``
    each text gives its one dict, as the ``'text-classification'`` pipeline does."""
    self._require(BERTForSequenceClassification, 'classify')
    single = isinstance(texts, str)
    logits = self.logits([texts] if single else texts, pairs)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = probs.shape[1] if top_k is None else min(top_k, probs.shape[1])
    out = []
    for row in probs:
      best = np.argsort(-row, kind='stable')[:k]
      ranked = [{'label': self.labels[i], 'score': float(row[i])} for i in best]
      out.append(ranked[0] if top_k == 1 else ranked)
    return out[0] if single else out

  def logits(self, texts, pairs=None) -> np.ndarray:
    """The model's float32 logits for a batch of texts: ``(B, C)`` for a classifier, ``(B, T, V)`` otherwise."""
    batch = self.tokenizer(list(texts), None if pairs is None else list(pairs), padding='longest')
    valid = batch['attention_mask'].astype(bool)
    # GPT has no segments; the BERT classes take them.
    segments = {} if isinstance(self.model, GPT) else {'token_type_ids': batch['token_type_ids']}
    return np.asarray(
      self.model.apply({'params': self.params}, batch['input_ids'], valid=valid, **segments)
    )

  def fill_mask(self, text: str, *, top_k: int = 5):
    """The ``top_k`` most probable tokens for each mask token of ``text``: ``[{'score', 'token', 'token_str',
    'sequence'}]`` best first, one such list per mask (the list itself when there is one mask)."""
    self._require(BERTForMaskedLM, 'fill_mask')
    mask_id = self.tokenizer.mask_id
    if mask_id is None:
      raise ValueError('this tokenizer has no mask token')
    ids = self.tokenizer([text])['input_ids'][0]
    where = np.flatnonzero(ids == mask_id)
    if not where.size:
      raise ValueError(
        f'fill_mask needs a {self.tokenizer.mask_token} token in the text, got {text!r}'
      )
    probs = np.asarray(jax.nn.softmax(self.logits([text])[0], axis=-1))
    # as the fill-mask pipeline: a token's text keeps special tokens ('[CLS]' can be a guess), and with several
    # masks each sequence fills one and keeps the others (and the other special tokens) as written
    keep_special = where.size > 1
    results = []
    for position in where:
      best = np.argsort(-probs[position], kind='stable')[:top_k]
      filled = []
      for token in best.tolist():
        row = ids.copy()
        row[position] = token
        filled.append(
          dict(
            score=float(probs[position, token]),
            token=token,
            token_str=self.tokenizer.decode([token], skip_special_tokens=False),
            sequence=self.tokenizer.decode(
              row[row != self.tokenizer.pad_id].tolist(), skip_special_tokens=not keep_special
            ),
          )
        )
      results.append(filled)
    return results[0] if len(results) == 1 else results

  def embed(self, texts, *, normalize: bool = False) -> np.ndarray:
    """``(B, D)`` sentence embeddings: the encoder's last hidden states averaged over the real tokens, as
    sentence-transformers pools MiniLM-type models; ``normalize``: unit length (its ``Normalize`` module)."""
    batch = self.tokenizer(list(texts), padding='longest')
    hidden = np.asarray(self._hidden_states(batch), np.float32)  # (B, T, D)
    weights = batch['attention_mask'][..., None].astype(np.float32)  # (B, T, 1)
    pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    if normalize:
      pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled

  # --------------------------------------------------------------------------------------------------------------------
  # Saving

  def save(self, path: str | os.PathLike) -> None:
    """Writes a directory that ``transformers``' ``from_pretrained`` and ``AutoTokenizer`` load: ``config.json``
    (with the label names of a classifier), ``model.safetensors`` and the tokenizer files."""
    path = Path(path)
    save_hf(self.model, self.params, path)
    config = {**self.hf_config, **json.loads((path / 'config.json').read_text())}
    if self.labels is not None:
      config['id2label'] = {str(i): name for i, name in enumerate(self.labels)}
      config['label2id'] = {name: i for i, name in enumerate(self.labels)}
    (path / 'config.json').write_text(json.dumps(config, indent=2))
    self.tokenizer.save(path)

  # --------------------------------------------------------------------------------------------------------------------

  def _require(self, cls: type, method: str) -> None:
    if not isinstance(self.model, cls):
      raise TypeError(
        f'{method} needs a {cls.__name__} checkpoint; this one is a {type(self.model).__name__}'
      )

  def _special(self, key: str, default):
    value = self.hf_config.get(key)
    return default if value is None else value

  def _hidden_states(self, batch):
    """``(B, T, D)`` last hidden states of the encoder (BERT) or decoder (GPT) for a tokenized batch."""
    valid = batch['attention_mask'].astype(bool)
    if isinstance(self.model, GPT):
      return self.model.apply(
        {'params': self.params}, batch['input_ids'], valid=valid, method=GPT.hidden_states
      )
    encoder, params = BERT(self.model.config, add_pooler=False), self.params
    if not isinstance(self.model, BERT):
      params = params['bert']
    params = {k: v for k, v in params.items() if k != 'pooler'}
    hidden, _ = encoder.apply(
      {'params': params}, batch['input_ids'], token_type_ids=batch['token_type_ids'], valid=valid
    )
    return hidden
