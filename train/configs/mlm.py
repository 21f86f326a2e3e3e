"""``mlm``: BERT masked-language-model pretraining on a text source (default: the Python docs, by character)."""

import ml_collections

from train.configs import default, model_fields
from transformer_jax import BERTConfig


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task = 'mlm'
  # Share of the tokens chosen for prediction (of those 80% [MASK], 10% random, 10% unchanged).
  config.data.mask_prob = 0.15
  config.model = model_fields(
    BERTConfig,
    num_layers=2,
    d_model=128,
    num_heads=4,
    d_ff=512,
    max_len=128,  # >= data.seq_len
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    num_labels=2,  # unused by the masked-LM head; kept so a classify run can start from these weights
  )
  config.num_train_steps = 300
  config.learning_rate = 1e-3
  config.lr_schedule = 'linear'
  config.eval_every_steps = 100
  return config
