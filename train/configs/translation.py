"""``translation``: the encoder-decoder on numbers to English words ("4217" -> "four thousand two hundred
seventeen"), generated on the fly; point ``data.path`` at a ``source<TAB>target`` TSV for real pairs, and
``init_from`` at a BART, Marian or T5 directory to fine-tune it (translation, summarisation: any text to text)."""

import ml_collections

from train.configs import default, model_fields
from transformer_jax import TransformerConfig


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task = 'translation'

  config.data = ml_collections.ConfigDict()
  # A TSV of source<TAB>target lines, a .jsonl file of {"source": ..., "target": ...} records, or 'builtin'
  # (numbers to words, no download).
  config.data.path = 'builtin'
  # The fields of a .jsonl file that hold the two sides.
  config.data.source_field = 'source'
  config.data.target_field = 'target'
  # Source and target vocabularies: digits by character, words by word.
  config.data.vocab = 'char'
  config.data.target_vocab = 'word'
  config.data.bpe_vocab_size = 4096
  # Share of a TSV's pairs (after a seeded shuffle) held out for validation.
  config.data.val_fraction = 0.05
  # Built-in task: how many pairs, and the longest number in digits (validation numbers never appear in training).
  config.data.train_size = 20000
  config.data.val_size = 500
  config.data.max_digits = 6
  # Padded lengths; longer pairs are truncated (the target keeps room for [EOS]).
  config.data.src_len = 12
  config.data.tgt_len = 16
  # Validation pairs decoded greedily for BLEU, ROUGE and exact match at each evaluation.
  config.data.bleu_examples = 256
  # Which of them picks the best checkpoints: 'bleu', 'rouge1', 'rouge2', 'rougeL' or 'exact_match'.
  config.data.metric = 'bleu'

  config.model = model_fields(
    TransformerConfig,
    num_layers=2,
    d_model=128,
    num_heads=4,
    d_ff=256,
    max_len=32,  # >= src_len and tgt_len
    dropout_rate=0.1,
    attention_dropout_rate=0.0,
    pre_norm=True,  # trains from step 0 at this learning rate; the paper's post-norm needs a long warmup
    final_norm=True,
  )
  config.batch_size = 64
  config.num_train_steps = 1200
  # The paper's schedule: linear warmup, then inverse square root; and its label smoothing.
  config.lr_schedule = 'rsqrt'
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.label_smoothing = 0.1
  config.weight_decay = 0.01
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  return config
