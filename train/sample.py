"""Use a trained run: ``python -m train.sample --workdir=runs/lm [--text="The "]... [--format=json]``.

``lm`` continues each ``--text`` (default: the run's ``sample.prompt``); ``translation`` translates each ``--text``;
``classify`` labels each ``--text``; without ``--text``, the other tasks show their end-of-run sample on validation
data. The newest readable checkpoint of the workdir is used, with the vocabulary and config saved beside it.

Each input prints as a header line naming it (quoted, so its edge spaces show), then what the model makes of it as
text, newlines and all::

    --- prompt: "The "
    The cre alated ...

``--format=json`` prints one JSON object per input and line instead (see :func:`respond`), for scripts.
"""

from __future__ import annotations

import json

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
flags.DEFINE_enum(
  'format',
  'text',
  ['text', 'json'],
  'text: each input under a header line, then the output as text; json: one JSON object per input and line '
  '({"task", "prompt", "output"}, plus "translation", or "label" and "probabilities"; a validation sample, '
  'without --text, as {"task", "sample"}).',
)

# What the header calls the input of each task.
_INPUT_NAMES = {'lm': 'prompt', 'translation': 'source', 'classify': 'text'}


def respond(task, params, text: str, rng, beam_size: int = 1) -> dict:
  """What the model makes of one input ``text``: ``task``, ``prompt`` (``text``) and ``output``, the answer as
  text (lm: the prompt and its continuation, as transformers' text-generation pipeline gives them; translation: the
  translation; classify: the label), plus a translation's ``translation`` and a classifier's ``label`` and
  ``probabilities`` (label name -> probability)."""
  record = {'task': task.config.task, 'prompt': text}
  if isinstance(task, LanguageModelTask):
    return {**record, 'output': task.continue_text(params, text, rng)}
  if isinstance(task, TranslationTask):
    ids, valid = task.encode_sources([text])
    translation = task.translate(params, ids, beam_size=beam_size, valid=valid)[0]
    return {**record, 'output': translation, 'translation': translation}
  if isinstance(task, ClassificationTask):
    probabilities = task.predict(params, task.encode_texts([text]))[0]
    label = task.labels.name(int(probabilities.argmax()))
    by_name = {task.labels.name(i): float(p) for i, p in enumerate(probabilities)}
    return {**record, 'output': label, 'label': label, 'probabilities': by_name}
  raise ValueError(f'--text is not supported for the {task.config.task!r} task; run without it')


def as_text(record: dict) -> str:
  """A :func:`respond` record for a person: a header line with the input, then the output as it reads."""
  # the input quoted, so its edge spaces and newlines show; the output as it is
  header = f'--- {_INPUT_NAMES[record["task"]]}: {json.dumps(record["prompt"], ensure_ascii=False)}'
  output = record['output']
  if 'probabilities' in record:
    listed = ', '.join(f'{name} {p:.3f}' for name, p in record['probabilities'].items())
    output += f' (probabilities: {listed})'
  return f'{header}\n{output}'


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
  texts = FLAGS.text or ([task.config.sample.prompt] if isinstance(task, LanguageModelTask) else [])
  if not texts:  # the task's own sample of validation examples
    shown = task.sample(params, rng)
    print(
      json.dumps({'task': task.config.task, 'sample': shown}) if FLAGS.format == 'json' else shown
    )
  for i, text in enumerate(texts):
    record = respond(task, params, text, rng, FLAGS.beam_size)
    if FLAGS.format == 'json':
      print(json.dumps(record))
    else:
      print(('\n' if i else '') + as_text(record))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
