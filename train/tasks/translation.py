"""``translation``: the encoder-decoder on source/target pairs, from scratch (our vocabularies, the built-in numbers
to words by default) or from a pretrained BART, Marian or T5 (``init_from``: its tokenizer, start token and
generation settings). Scored by BLEU (sacrebleu), ROUGE (rouge-score) and exact match on the validation pairs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from train import data, number_words, readers
from train.tasks.base import check_lengths, cut_at_eos
from train.tasks.examples import ExampleTask, split_examples
from train.vocab import BOS, EOS
from transformer_jax import Transformer, TransformerConfig
from transformer_jax.validation import check_token_ids

# What data.metric may pick the best checkpoints by (all are reported).
METRICS = ('bleu', 'rouge1', 'rouge2', 'rougeL', 'exact_match')


def rouge_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1, -2 and -L F-measures (0-100) of the ``rouge-score`` package, stemmed as summarisation papers
  report them."""
  from rouge_score import rouge_scorer

  names = ('rouge1', 'rouge2', 'rougeL')
  scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
  scores = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
  return {n: 100 * float(np.mean([s[n].fmeasure for s in scores])) for n in names}


class TranslationTask(ExampleTask):
  """``translation``: the encoder-decoder on ``source<TAB>target`` pairs (or the built-in numbers to words)."""

  metric_mode = 'max'

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    cfg = config.data
    self.metric = cfg.get('metric', 'bleu')
    if self.metric not in METRICS:
      raise ValueError(f'data.metric must be one of {METRICS}, got {self.metric!r}')
    check_lengths(config, 'src_len', 'tgt_len', pretrained=self.pretrained)
    train, val = self._pairs()
    self.val_pairs = val
    if self.pretrained is None:
      self.src_vocab = self._vocab('vocab.json', (s for s, _ in train), cfg.vocab)
      self.tgt_vocab = self._vocab('target_vocab.json', (t for _, t in train), cfg.target_vocab)
      self.train, self.val = (
        data.encode_pairs(pairs, self.src_vocab, self.tgt_vocab, cfg.src_len, cfg.tgt_len)
        for pairs in (train, val)
      )
      sizes = dict(src_vocab_size=self.src_vocab.size, tgt_vocab_size=self.tgt_vocab.size, pad_id=0)
      self.model = self._build_model(Transformer, TransformerConfig, **sizes)
      self.decoding = dict(bos_id=BOS, eos_id=EOS, pad_id=data.PAD)
      return
    self.vocab = self.pretrained.vocab
    self.tokenizer = self.vocab.tokenizer
    self.target_tokenizer = self.tokenizer.for_targets()
    self.decoding = self.pretrained.decoding
    self.model = self._build_model(Transformer, TransformerConfig)
    self.train, self.val = (self._encode_pretrained(pairs) for pairs in (train, val))

  def _pairs(self):
    cfg = self.config.data
    if cfg.path == readers.BUILTIN:
      return number_words.number_dataset(
        cfg.train_size, cfg.val_size, cfg.max_digits, self.config.seed
      )
    pairs = readers.read_pairs(
      cfg.path, cfg.get('source_field', 'source'), cfg.get('target_field', 'target')
    )
    return split_examples(pairs, cfg.val_fraction, self.config.seed)

  def _encode_pretrained(self, pairs) -> dict:
    """Pairs as the checkpoint's tokenizer frames them (``transformers``' ``tokenizer(sources, text_target=...)``):
    labels end in the end token, and the decoder reads them shifted right behind its start token."""
    cfg, model = self.config.data, self.model.config
    frame = dict(padding='max_length', truncation=True)
    sources = self.tokenizer([s for s, _ in pairs], max_length=cfg.src_len, **frame)
    labels = self.target_tokenizer([t for _, t in pairs], max_length=cfg.tgt_len, **frame)
    check_token_ids(sources['input_ids'], model.src_vocab_size, 'source ids')
    check_token_ids(labels['input_ids'], model.tgt_vocab_size, 'target ids')
    real = labels['attention_mask'].astype(bool)
    start = np.full((len(pairs), 1), self.decoding['bos_id'], np.int32)
    return {
      'sources': sources['input_ids'],
      # The start token is often the padding id (Marian, T5), so validity travels with the ids.
      'source_valid': sources['attention_mask'].astype(bool),
      'inputs': np.concatenate([start, labels['input_ids'][:, :-1]], axis=1),
      'input_valid': np.concatenate([np.ones_like(start, bool), real[:, :-1]], axis=1),
      'targets': labels['input_ids'],
      'weights': real.astype(np.float32),
    }

  def model_inputs(self, batch):
    return batch['sources'], batch['inputs']

  def model_options(self, batch):
    if 'source_valid' not in batch:
      return {}
    return dict(src_valid=batch['source_valid'], tgt_valid=batch['input_valid'])

  def translate(self, params, sources: np.ndarray, beam_size: int = 1, valid=None) -> list[str]:
    """Translations of ``(N, S)`` source ids (greedy unless ``beam_size > 1``), as detokenized text. A pretrained
    model decodes with its generation settings, up to ``data.tgt_len`` new tokens."""
    from transformer_jax.generation import translate

    options = {**self.decoding, 'max_len': self.config.data.tgt_len, 'beam_size': beam_size}
    ids = np.asarray(
      translate(self.model, params, jnp.asarray(sources), src_valid=valid, **options)
    )
    return [self.decode_target(row) for row in ids]

  def decode_target(self, ids) -> str:
    eos = self.decoding['eos_id']
    ids = [int(i) for i in ids]
    ids = ids[: ids.index(eos)] if eos in ids else ids
    if self.pretrained is None:
      return self.tgt_vocab.decode(ids)
    return self.target_tokenizer.decode(ids, skip_special_tokens=True)

  def decode_source(self, ids) -> str:
    if self.pretrained is None:
      return self.src_vocab.decode(ids)
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_sources(self, texts: list[str]):
    """Source texts -> ``(N, data.src_len)`` ids and their validity (``None``: from the padding id)."""
    length = self.config.data.src_len
    if self.pretrained is None:
      return data.pad_rows([self.src_vocab.encode(t)[:length] for t in texts], length), None
    frame = self.tokenizer(texts, padding='max_length', truncation=True, max_length=length)
    return frame['input_ids'], frame['attention_mask'].astype(bool)

  def _validation(self, count: int):
    valid = self.val.get('source_valid')
    return self.val['sources'][:count], None if valid is None else valid[:count]

  def extra_eval(self, params):
    import sacrebleu

    count = min(len(self.val['sources']), self.config.data.bleu_examples)
    sources, valid = self._validation(count)
    hypotheses = self.translate(params, sources, valid=valid)
    references = [t for _, t in self.val_pairs[:count]]
    if self.pretrained is None:  # what our vocabularies can spell
      references = [self.tgt_vocab.decode(cut_at_eos(row)) for row in self.val['targets'][:count]]
    exact = np.mean([h == r for h, r in zip(hypotheses, references)])
    return {
      'bleu': sacrebleu.corpus_bleu(hypotheses, [references]).score,
      **rouge_scores(hypotheses, references),
      'exact_match': float(exact),
    }

  def sample(self, params, rng):
    sources, valid = self._validation(5)
    hypotheses = self.translate(params, sources, valid=valid)
    lines = [
      f'{self.decode_source(s)!r} -> {h!r} (reference {t!r})'
      for s, h, (_, t) in zip(sources, hypotheses, self.val_pairs)
    ]
    return '\n'.join(lines)
