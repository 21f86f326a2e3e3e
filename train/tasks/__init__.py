"""The four tasks: what data each reads, which model it trains, how it is scored and what it shows at the end.

A :class:`Task` turns a step number into a numpy batch (a pure function of ``(seed, step)``), applies its model to a
batch, and optionally adds metrics (BLEU) and a sample. The trainer knows nothing else about tasks.
"""

from train.tasks.base import Task, cut_at_eos, fixed_batches, model_config
from train.tasks.examples import ClassificationTask, split_examples
from train.tasks.text import LanguageModelTask, MaskedLanguageModelTask
from train.tasks.translation import TranslationTask

TASKS = {
  'lm': LanguageModelTask,
  'mlm': MaskedLanguageModelTask,
  'translation': TranslationTask,
  'classify': ClassificationTask,
}


def build_task(config, workdir: str) -> Task:
  """Reads and checks the data of ``config.task`` (clear errors here, before anything compiles)."""
  if config.task not in TASKS:
    raise ValueError(f'unknown task {config.task!r}; expected one of {sorted(TASKS)}')
  return TASKS[config.task](config, workdir)


__all__ = [
  'ClassificationTask',
  'LanguageModelTask',
  'MaskedLanguageModelTask',
  'TASKS',
  'Task',
  'TranslationTask',
  'build_task',
  'cut_at_eos',
  'fixed_batches',
  'model_config',
  'split_examples',
]
