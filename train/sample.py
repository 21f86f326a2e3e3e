"""Use a trained run: ``python -m train.sample --workdir=runs/lm [--text="The "]...``.

``lm`` continues each ``--text`` (default: the run's ``sample.prompt``); ``translation`` translates each ``--text``;
``classify`` labels each ``--text``; without ``--text``, every task shows its end-of-run sample on validation data.
The newest readable checkpoint of the workdir is used, with the vocabulary and config saved beside it.
"""

from __future__ import annotations

import jax
from absl import app, flags

from train.errors import parse_flags, run_main
from train.runs import load_run
from train.tasks import ClassificationTask, LanguageModelTask, TranslationTask
from train.trainer import setup_logging

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


def respond(task, params, text: str, rng, beam_size: int = 1) -> str:
  """What the model makes of one input ``text``."""
  if isinstance(task, LanguageModelTask):
    return task.continue_text(params, text, rng)
  if isinstance(task, TranslationTask):
    ids, valid = task.encode_sources([text])
    return task.translate(params, ids, beam_size=beam_size, valid=valid)[0]
  if isinstance(task, ClassificationTask):
    probabilities = task.predict(params, task.encode_texts([text]))[0]
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
    print(f'{text!r} -> {respond(task, params, text, rng, flags.FLAGS.beam_size)!r}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
