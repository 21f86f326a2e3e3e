"""Use a trained run: ``python -m train.sample --workdir=runs/lm [--text="The "]...``.

``lm`` continues each ``--text`` (default: the run's ``sample.prompt``); ``translation`` translates each ``--text``;
``classify`` labels each ``--text``; without ``--text``, every task shows its end-of-run sample on validation data.
The newest readable checkpoint of the workdir is used, with the vocabulary and config saved beside it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from train.checkpoint import Checkpoints
from train.errors import parse_flags, run_main
from train.optim import make_optimizer
from train.steps import create_state
from train.tasks import ClassificationTask, LanguageModelTask, TranslationTask, build_task
from train.trainer import setup_logging
from train.vocab import BOS

flags.DEFINE_string('workdir', None, 'The workdir of a training run.', required=True)
flags.DEFINE_multi_string(
  'text', [], 'Prompt (lm), source (translation) or text (classify); repeatable.'
)
flags.DEFINE_integer('max_new_tokens', None, 'lm: tokens to generate (default: the run config).')
flags.DEFINE_float(
  'temperature', None, 'lm: sampling temperature; 0 is greedy (default: the run config).'
)
flags.DEFINE_integer('beam_size', 1, 'translation: beam width (1 = greedy).')
flags.DEFINE_integer('seed', 0, 'lm: sampling seed.')


def load_run(workdir: str):
  """``(task, params)`` of the newest restorable checkpoint in ``workdir``."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{workdir} holds no training run (no config.json); train one with '
      f'python -m train --workdir={workdir}'
    )
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = build_task(config, workdir)
  with Checkpoints.reader(workdir) as checkpoints:
    state, meta = checkpoints.restore(create_state(task, make_optimizer(config)[0], config.seed))
  if meta is None:
    raise FileNotFoundError(f'no checkpoint to restore in {workdir}')
  return task, state.params


def respond(task, params, text: str, rng) -> str:
  """What the model makes of one input ``text``."""
  if isinstance(task, LanguageModelTask):
    from transformer_jax.generation import generate

    prompt = task.vocab.encode(text) or [BOS]
    new = generate(
      task.model,
      params,
      jnp.asarray([prompt], jnp.int32),
      rng=rng,
      max_new_tokens=min(
        task.config.sample.max_new_tokens, task.config.model.max_len - len(prompt)
      ),
      temperature=task.config.sample.temperature,
      top_k=task.config.sample.top_k or None,
    )
    return task.vocab.decode(prompt + np.asarray(new[0]).tolist())
  if isinstance(task, TranslationTask):
    source = task.src_vocab.encode(text)[: task.config.data.src_len]
    ids = np.zeros((1, task.config.data.src_len), np.int32)
    ids[0, : len(source)] = source
    return task.translate(params, ids, beam_size=flags.FLAGS.beam_size)[0]
  if isinstance(task, ClassificationTask):
    ids = np.zeros((1, task.config.data.seq_len), np.int32)
    tokens = [BOS] + task.vocab.encode(text)[: task.config.data.seq_len - 1]
    ids[0, : len(tokens)] = tokens
    probabilities = task.predict(params, ids)[0]
    listed = ', '.join(f'{task.labels.name(i)} {p:.3f}' for i, p in enumerate(probabilities))
    return f'{task.labels.name(int(probabilities.argmax()))} (probabilities: {listed})'
  raise ValueError(f'--text is not supported for the {task.config.task!r} task; run without it')


def main(argv):
  del argv  # parse_flags refuses stray arguments
  run_main(sample)


def sample():
  setup_logging()
  FLAGS = flags.FLAGS
  task, params = load_run(FLAGS.workdir)
  overrides = {
    k: v
    for k, v in (('max_new_tokens', FLAGS.max_new_tokens), ('temperature', FLAGS.temperature))
    if v is not None
  }
  with task.config.unlocked():
    task.config.sample.update(overrides)
  rng = jax.random.PRNGKey(FLAGS.seed)
  if not FLAGS.text:
    print(task.sample(params, rng))
  for text in FLAGS.text:
    print(f'{text!r} -> {respond(task, params, text, rng)!r}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
