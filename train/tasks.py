"""The four tasks: what data each reads, which model it trains, how it is scored and what it shows at the end.

A :class:`Task` turns a step number into a numpy batch (a pure function of ``(seed, step)``), applies its model to a
batch, and optionally adds metrics (BLEU) and a sample. The trainer knows nothing else about tasks.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from train import data, number_words
from train.losses import cross_entropy_sums
from train.vocab import BOS, EOS, Vocab, build_vocab, load_vocab
from transformer_jax import (BERTConfig, BERTForMaskedLM, BERTForSequenceClassification, GPT, GPTConfig, Transformer,
                             TransformerConfig)

EVAL_MASK_SEED = 2**31 - 1  # the masks of the MLM evaluation set, fixed for the whole run


def fixed_batches(arrays: dict, batch_size: int, limit: int) -> list[dict]:
  """Up to ``limit`` batches of ``batch_size`` rows; the last is filled up with weight-0 copies of its first row, so
  every batch has one shape (no recompiling) and the copies count for nothing."""
  count = len(arrays['weights'])
  batches = []
  for start in range(0, min(count, limit * batch_size), batch_size):
    rows = np.arange(start, start + batch_size)
    real = rows < count
    batch = {k: v[np.where(real, rows, start)] for k, v in arrays.items()}
    batch['weights'] = batch['weights'] * real.reshape((-1,) + (1,) * (batch['weights'].ndim - 1))
    batches.append(batch)
  return batches


def model_config(config_cls, config, **derived):
  """The model's frozen config: the run config's ``model`` fields plus those the vocabulary sets."""
  return config_cls.from_dict({**config.model.to_dict(), **derived})


def check_lengths(config, *names):
  """Sequence lengths of ``config.data`` must fit the model's positions."""
  for name in names:
    if config.data[name] > config.model.max_len:
      raise ValueError(f'data.{name}={config.data[name]} exceeds model.max_len={config.model.max_len}')


def cut_at_eos(ids) -> list[int]:
  """A row of target ids up to (not including) its first ``[EOS]``."""
  ids = [int(i) for i in ids]
  return ids[:ids.index(EOS)] if EOS in ids else ids


class Task:
  """Base class. Subclasses set ``model``, ``metric`` and ``metric_mode`` and implement the batch functions."""

  metric = 'loss'  # validation metric that picks the best checkpoints
  metric_mode = 'min'
  token_level = True  # the loss is per token (perplexity makes sense), not per example

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    os.makedirs(workdir, exist_ok=True)

  def train_batch(self, step: int, rows: np.ndarray | None = None) -> dict:
    """Batch ``step`` as numpy arrays; with ``rows`` (indices into the batch), only those rows: what one process
    feeds to its devices. Either way a row's content depends only on ``(seed, step, row)``."""
    raise NotImplementedError

  def eval_batches(self) -> list[dict]:
    raise NotImplementedError

  def model_inputs(self, batch) -> tuple:
    """The model's positional arguments taken from a batch."""
    return (batch['inputs'],)

  def logits(self, params, batch, *, deterministic: bool, rng=None):
    return self.model.apply({'params': params}, *self.model_inputs(batch), deterministic=deterministic,
                            rngs=None if deterministic else {'dropout': rng})

  def loss_sums(self, params, batch, rng, deterministic: bool, label_smoothing: float = 0.0) -> dict:
    logits = self.logits(params, batch, deterministic=deterministic, rng=rng)
    return cross_entropy_sums(logits, batch['targets'], batch['weights'], label_smoothing)

  def init_params(self, rng):
    """Fresh parameters, from one row of the first batch."""
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), self.train_batch(0))
    return jax.jit(lambda key: self.model.init(key, *self.model_inputs(example))['params'])(rng)

  def extra_eval(self, params) -> dict:
    """Metrics beyond the loss (BLEU, exact match); empty by default."""
    return {}

  def baseline(self) -> dict:
    """Reference numbers to print beside the results (the unigram entropy of a language model)."""
    return {}

  def sample(self, params, rng) -> str:
    """What the trained model does, as text for the end of the run."""
    raise NotImplementedError

  def _vocab(self, filename: str, texts, kind: str) -> Vocab:
    """The workdir's saved vocabulary if there is one (a resumed run must keep its ids), else a new one, saved."""
    path = os.path.join(self.workdir, filename)
    if os.path.exists(path):
      return load_vocab(path)
    vocab = build_vocab(kind, texts, self.config.data.get('bpe_vocab_size', 4096))
    vocab.save(path)
    return vocab


# ------------------------------------------------------------------------------------------------ text streams
class TextTask(Task):
  """Shared by ``lm`` and ``mlm``: one vocabulary and one memory-mapped token stream, split train/validation."""

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    cfg = config.data
    check_lengths(config, 'seq_len')
    self.vocab = self._vocab('vocab.json', data.read_texts(cfg.path), cfg.vocab)
    tokens = self._token_file()
    self.train_tokens, self.val_tokens = data.split_tokens(tokens, cfg.val_fraction, cfg.seq_len)

  def _token_file(self) -> np.ndarray:
    """``workdir/data/tokens.bin``, tokenized once; rebuilt when the data settings it came from change."""
    folder = os.path.join(self.workdir, 'data')
    os.makedirs(folder, exist_ok=True)
    path, source = os.path.join(folder, 'tokens.bin'), os.path.join(folder, 'source.json')
    wanted = json.dumps({'path': self.config.data.path, 'vocab': self.config.data.vocab})
    if os.path.exists(path) and os.path.exists(source) and open(source).read() == wanted:
      return data.open_token_file(path, self.vocab.size)
    tokens = data.write_token_file(data.read_texts(self.config.data.path), self.vocab, path)
    with open(source, 'w') as f:
      f.write(wanted)
    return tokens

  def baseline(self):
    return {'unigram_loss': data.unigram_cross_entropy(self.train_tokens, self.val_tokens, self.vocab.size)}


class LanguageModelTask(TextTask):
  """``lm``: GPT next-token prediction."""

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.model = GPT(model_config(GPTConfig, config, vocab_size=self.vocab.size, pad_id=None))

  def train_batch(self, step, rows=None):
    cfg = self.config
    return data.lm_example(data.random_windows(self.train_tokens, cfg.batch_size, cfg.data.seq_len + 1, cfg.seed,
                                               step, rows))

  def eval_batches(self):
    cfg = self.config
    windows = data.consecutive_windows(self.val_tokens, cfg.data.seq_len + 1, cfg.eval_batches * cfg.batch_size)
    return fixed_batches(data.lm_example(windows), cfg.batch_size, cfg.eval_batches)

  def sample(self, params, rng):
    from transformer_jax.generation import generate
    cfg = self.config.sample
    prompt = self.vocab.encode(cfg.prompt) or [BOS]
    new_tokens = min(cfg.max_new_tokens, self.config.model.max_len - len(prompt))  # positions the model has
    new = generate(self.model, params, jnp.asarray([prompt], jnp.int32), max_new_tokens=new_tokens,
                   temperature=cfg.temperature, top_k=cfg.top_k or None, rng=rng)
    return self.vocab.decode(prompt + np.asarray(new[0]).tolist())


class MaskedLanguageModelTask(TextTask):
  """``mlm``: BERT masked-token prediction; only the masked positions carry loss."""

  metric = 'accuracy'
  metric_mode = 'max'

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    self.model = BERTForMaskedLM(model_config(BERTConfig, config, vocab_size=self.vocab.size, pad_id=0))

  def _mask(self, windows, *seed):
    return data.mask_tokens(windows, self.vocab.size, np.random.default_rng(seed), self.config.data.mask_prob)

  def train_batch(self, step, rows=None):
    cfg = self.config
    rows = np.arange(cfg.batch_size) if rows is None else rows
    windows = data.random_windows(self.train_tokens, cfg.batch_size, cfg.data.seq_len, cfg.seed, step, rows)
    # One draw per row, so a process masking only its rows masks them as a single process would; the 1 keeps the
    # mask draws apart from the window draws.
    parts = [self._mask(window[None], cfg.seed, step, 1, int(row)) for window, row in zip(windows, rows)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def eval_batches(self):
    cfg = self.config
    windows = data.consecutive_windows(self.val_tokens, cfg.data.seq_len, cfg.eval_batches * cfg.batch_size)
    return fixed_batches(self._mask(windows, cfg.seed, EVAL_MASK_SEED), cfg.batch_size, cfg.eval_batches)

  def sample(self, params, rng):
    batch = jax.tree.map(lambda x: x[:1], self.eval_batches()[0])
    predicted = np.asarray(self.logits(params, batch, deterministic=True).argmax(-1))[0]
    chosen = batch['weights'][0] > 0
    original = batch['targets'][0]
    hits = int((predicted == original)[chosen].sum())
    return (f'original : {self.vocab.decode(original)!r}\n'
            f'predicted: {self.vocab.decode(np.where(chosen, predicted, original))!r} '
            f'({hits} of {int(chosen.sum())} masked tokens right)')


# ------------------------------------------------------------------------------------------- example datasets
def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
  """A seeded shuffle, then the last ``val_fraction`` (at least one example) validates."""
  order = np.random.default_rng(seed).permutation(len(examples))
  examples = [examples[i] for i in order]
  cut = len(examples) - max(1, int(len(examples) * val_fraction))
  if cut < 1:
    raise ValueError(f'{len(examples)} example(s) cannot be split into training and validation')
  return examples[:cut], examples[cut:]


class ExampleTask(Task):
  """Shared by ``translation`` and ``classify``: whole examples in numpy arrays, shuffled once per epoch."""

  def train_batch(self, step, rows=None):
    examples = data.epoch_indices(len(self.train['weights']), self.config.batch_size, self.config.seed, step, rows)
    return {k: v[examples] for k, v in self.train.items()}

  def eval_batches(self):
    return fixed_batches(self.val, self.config.batch_size, self.config.eval_batches)


class TranslationTask(ExampleTask):
  """``translation``: the encoder-decoder on ``source<TAB>target`` pairs (or the built-in numbers to words)."""

  metric = 'bleu'
  metric_mode = 'max'

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    cfg = config.data
    check_lengths(config, 'src_len', 'tgt_len')
    train, val = self._pairs()
    self.src_vocab = self._vocab('vocab.json', (s for s, _ in train), cfg.vocab)
    self.tgt_vocab = self._vocab('target_vocab.json', (t for _, t in train), cfg.target_vocab)
    encode = lambda pairs: data.encode_pairs(pairs, self.src_vocab, self.tgt_vocab, cfg.src_len, cfg.tgt_len)  # noqa: E731
    self.train, self.val = encode(train), encode(val)
    self.model = Transformer(model_config(TransformerConfig, config, src_vocab_size=self.src_vocab.size,
                                          tgt_vocab_size=self.tgt_vocab.size, pad_id=0))

  def _pairs(self):
    cfg = self.config.data
    if cfg.path == data.BUILTIN:
      return number_words.number_dataset(cfg.train_size, cfg.val_size, cfg.max_digits, self.config.seed)
    return split_examples(data.read_pairs(cfg.path), cfg.val_fraction, self.config.seed)

  def model_inputs(self, batch):
    return batch['sources'], batch['inputs']

  def translate(self, params, sources: np.ndarray, beam_size: int = 1) -> list[str]:
    """Translations of ``(N, S)`` source ids (greedy unless ``beam_size > 1``), as detokenized text."""
    from transformer_jax.generation import translate
    ids = translate(self.model, params, jnp.asarray(sources), max_len=self.config.data.tgt_len, bos_id=BOS,
                    eos_id=EOS, beam_size=beam_size)
    return [self.tgt_vocab.decode(cut_at_eos(row)) for row in np.asarray(ids)]

  def extra_eval(self, params):
    import sacrebleu
    count = min(len(self.val['sources']), self.config.data.bleu_examples)
    hypotheses = self.translate(params, self.val['sources'][:count])
    references = [self.tgt_vocab.decode(cut_at_eos(row)) for row in self.val['targets'][:count]]
    exact = np.mean([h == r for h, r in zip(hypotheses, references)])
    return {'bleu': sacrebleu.corpus_bleu(hypotheses, [references]).score, 'exact_match': float(exact)}

  def sample(self, params, rng):
    sources = self.val['sources'][:5]
    hypotheses = self.translate(params, sources)
    lines = [f'{self.src_vocab.decode(s)!r} -> {h!r} (reference {self.tgt_vocab.decode(cut_at_eos(t))!r})'
             for s, h, t in zip(sources, hypotheses, self.val['targets'])]
    return '\n'.join(lines)


class ClassificationTask(ExampleTask):
  """``classify``: BERT's classification head on ``text,label`` rows (or a tiny built-in sentiment set)."""

  metric = 'accuracy'
  metric_mode = 'max'
  token_level = False

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    cfg = config.data
    check_lengths(config, 'seq_len')
    rows = (data.builtin_sentiment(cfg.builtin_size, config.seed) if cfg.path == data.BUILTIN
            else data.read_labelled(cfg.path))
    train, val = split_examples(rows, cfg.val_fraction, config.seed)
    self.vocab = self._vocab('vocab.json', (text for text, _ in train), cfg.vocab)
    num_labels = config.model.num_labels
    encode = lambda part: self._with_weights(data.encode_labelled(part, self.vocab, cfg.seq_len, num_labels))  # noqa: E731
    self.train, self.val = encode(train), encode(val)
    self.texts = [text for text, _ in val]
    self.model = BERTForSequenceClassification(model_config(BERTConfig, config, vocab_size=self.vocab.size, pad_id=0))

  @staticmethod
  def _with_weights(arrays):
    return {'inputs': arrays['inputs'], 'targets': arrays['labels'],
            'weights': np.ones(len(arrays['labels']), np.float32)}

  def sample(self, params, rng):
    batch = self.eval_batches()[0]
    predicted = np.asarray(self.logits(params, batch, deterministic=True).argmax(-1))
    return '\n'.join(f'{text!r}: predicted {p}, label {t}'
                     for text, p, t in list(zip(self.texts, predicted, batch['targets']))[:5])


TASKS = {'lm': LanguageModelTask, 'mlm': MaskedLanguageModelTask, 'translation': TranslationTask,
         'classify': ClassificationTask}


def build_task(config, workdir: str) -> Task:
  """Reads and checks the data of ``config.task`` (clear errors here, before anything compiles)."""
  if config.task not in TASKS:
    raise ValueError(f'unknown task {config.task!r}; expected one of {sorted(TASKS)}')
  return TASKS[config.task](config, workdir)
