"""``lm`` and ``mlm``: a model trained on one stream of tokens from a text source."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from train import data, readers
from train.tasks.base import (
  TOKEN_FILE,
  TOKEN_SOURCE,
  Task,
  check_lengths,
  eval_rows,
  fixed_batches,
  write_text,
)
from transformer_jax import GPT, BERTConfig, BERTForMaskedLM, GPTConfig

EVAL_MASK_SEED = 2**31 - 1  # the masks of the MLM evaluation set, fixed for the whole run


class TextTask(Task):
  """Shared by ``lm`` and ``mlm``: one vocabulary and one memory-mapped token stream, split train/validation."""

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    cfg = config.data
    check_lengths(config, 'seq_len', pretrained=self.pretrained)
    self.vocab = self._vocab('vocab.json', self._texts(), cfg.vocab)
    tokens = self._tokens()
    self.train_tokens, self.val_tokens = data.split_tokens(tokens, cfg.val_fraction, cfg.seq_len)

  def _texts(self):
    return readers.read_texts(self.config.data.path, self.config.data.get('text_field', 'text'))

  def _tokens(self) -> np.ndarray:
    """The token stream: ``workdir/data/tokens.bin`` if it was made from the same data settings, else tokenized
    now and saved there by :meth:`save`."""
    source = {
      'path': self.config.data.path,
      'vocab': self.config.data.vocab,
      'text_field': self.config.data.get('text_field', 'text'),
    }
    if self.pretrained is not None:  # tokenized by the pretrained model's tokenizer
      source.update(vocab=self.vocab.kind, init_from=self.pretrained.source)
    wanted = json.dumps(source)
    path, source = self._kept(TOKEN_FILE), self._kept(TOKEN_SOURCE)
    if path and source:
      with open(source) as f:
        if f.read() == wanted:
          return data.open_token_file(path, self.vocab.size)
    tokens = data.tokenize(self._texts(), self.vocab)
    self.pending[TOKEN_FILE] = functools.partial(data.save_token_file, tokens)
    self.pending[TOKEN_SOURCE] = lambda p: write_text(p, wanted)
    return tokens

  def baseline(self):
    return {
      'unigram_loss': data.unigram_cross_entropy(
        self.train_tokens, self.val_tokens, self.vocab.size
      )
    }


class LanguageModelTask(TextTask):
  """``lm``: GPT next-token prediction."""

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.model = self._build_model(GPT, GPTConfig, vocab_size=self.vocab.size, pad_id=None)

  def train_batch(self, step, rows=None):
    cfg = self.config
    return data.lm_example(
      data.random_windows(
        self.train_tokens, cfg.batch_size, cfg.data.seq_len + 1, cfg.seed, step, rows
      )
    )

  def eval_batches(self):
    cfg = self.config
    windows = data.consecutive_windows(self.val_tokens, cfg.data.seq_len + 1, eval_rows(cfg))
    return fixed_batches(data.lm_example(windows), cfg.batch_size)

  def continue_text(self, params, text: str, rng) -> str:
    """``text`` and what the model samples after it (settings of ``config.sample``), up to its last position."""
    from transformer_jax.generation import generate

    cfg = self.config.sample
    prompt = self.vocab.encode(text)
    if not prompt:
      if self.vocab.bos_id is None:
        raise ValueError(
          'this tokenizer has no start token to begin an empty prompt with; give a prompt'
        )
      prompt = [self.vocab.bos_id]
    new = generate(
      self.model,
      params,
      jnp.asarray([prompt], jnp.int32),
      max_new_tokens=min(cfg.max_new_tokens, self.model.config.max_len - len(prompt)),
      temperature=cfg.temperature,
      top_k=cfg.top_k or None,
      rng=rng,
    )
    return self.vocab.decode(prompt + np.asarray(new[0]).tolist())

  def sample(self, params, rng):
    return self.continue_text(params, self.config.sample.prompt, rng)


class MaskedLanguageModelTask(TextTask):
  """``mlm``: BERT masked-token prediction; only the masked positions carry loss."""

  metric = 'accuracy'
  metric_mode = 'max'

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.model = self._build_model(
      BERTForMaskedLM, BERTConfig, vocab_size=self.vocab.size, pad_id=0
    )

  def _mask(self, windows, *seed):
    return data.mask_tokens(
      windows, self.vocab, np.random.default_rng(seed), self.config.data.mask_prob
    )

  def train_batch(self, step, rows=None):
    cfg = self.config
    rows = np.arange(cfg.batch_size) if rows is None else rows
    windows = data.random_windows(
      self.train_tokens, cfg.batch_size, cfg.data.seq_len, cfg.seed, step, rows
    )
    # One draw per row, so a process masking only its rows masks them as a single process would; the 1 keeps the
    # mask draws apart from the window draws.
    parts = [
      self._mask(window[None], cfg.seed, step, 1, int(row)) for window, row in zip(windows, rows)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def eval_batches(self):
    cfg = self.config
    windows = data.consecutive_windows(self.val_tokens, cfg.data.seq_len, eval_rows(cfg))
    return fixed_batches(self._mask(windows, cfg.seed, EVAL_MASK_SEED), cfg.batch_size)

  def model_options(self, batch):
    """The head runs at the masked positions only: ``(B, P, V)`` logits."""
    return {'masked_positions': batch['positions']}

  def sample(self, params, rng):
    batch = jax.tree.map(lambda x: x[:1], self.eval_batches()[0])
    predicted = np.asarray(self.logits(params, batch, deterministic=True).argmax(-1))[0]  # (P,)
    chosen = batch['weights'][0] > 0
    positions, targets = batch['positions'][0][chosen], batch['targets'][0][chosen]
    original, filled = np.array(batch['inputs'][0]), np.array(batch['inputs'][0])
    original[positions], filled[positions] = targets, predicted[chosen]
    hits = int((predicted[chosen] == targets).sum())
    return (
      f'original : {self.vocab.decode(original)!r}\n'
      f'predicted: {self.vocab.decode(filled)!r} '
      f'({hits} of {int(chosen.sum())} masked tokens right)'
    )
