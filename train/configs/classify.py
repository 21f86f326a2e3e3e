"""``classify``: fine-tune BERT's classification head on a CSV/TSV of ``text,label`` rows (default: a tiny built-in
sentiment set in which "not" flips the label)."""

import ml_collections

from train.configs import default, model_fields
from transformer_jax import BERTConfig


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task = 'classify'

  config.data = ml_collections.ConfigDict()
  # A CSV (or .tsv) of text,label rows, a .jsonl file of {"text": ..., "label": ...} records, or 'builtin'. Labels
  # are integers in [0, model.num_labels), or names (positive, negative, ...) numbered in sorted order.
  config.data.path = 'builtin'
  # The fields of a .jsonl record (or the header of a CSV's label column) that hold the text and the label.
  config.data.text_field = 'text'
  config.data.label_field = 'label'
  config.data.vocab = 'char'
  config.data.bpe_vocab_size = 4096
  # Share of the rows (after a seeded shuffle) held out for validation.
  config.data.val_fraction = 0.1
  # Rows of the built-in set.
  config.data.builtin_size = 2000
  # [CLS] plus the text, truncated or padded to this many tokens.
  config.data.seq_len = 40

  config.model = model_fields(
    BERTConfig,
    num_layers=2,
    d_model=64,
    num_heads=4,
    d_ff=128,
    max_len=64,  # >= data.seq_len
    dropout_rate=0.1,
    attention_dropout_rate=0.0,
    num_labels=2,
  )
  config.batch_size = 32
  config.num_train_steps = 400
  config.learning_rate = 1e-3
  config.warmup_steps = 40
  config.eval_every_steps = 100
  config.log_every_steps = 50
  return config
