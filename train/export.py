"""Ship a run back: ``python -m train.export --workdir=runs/classify --out=DIR [--step=N]``.

Writes a Hugging Face model directory that ``transformers``' ``AutoModelFor*.from_pretrained(DIR)``, ``AutoTokenizer``
and ``pipeline(...)`` load: ``config.json`` (with the label names of a classifier as ``id2label``/``label2id``),
``model.safetensors`` and the tokenizer files. The run must use a Hugging Face tokenizer, i.e. have started from a
pretrained model (``init_from``); the newest readable checkpoint is exported, or the one of ``--step``.

A LoRA run exports its adapters merged into the base, or with ``--adapter`` as a PEFT adapter directory
(``adapter_config.json``, ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the
base model the run started from.
"""

from __future__ import annotations

from absl import app, flags

from train.errors import parse_flags, run_main
from train.runs import export, export_adapter
from train.trainer import setup_logging

flags.DEFINE_string('workdir', None, 'The workdir of a training run.', required=True)
flags.DEFINE_string('out', None, 'The Hugging Face directory to write.', required=True)
flags.DEFINE_integer('step', None, 'The checkpoint to export (default: the newest readable one).')
flags.DEFINE_bool(
  'adapter',
  False,
  "A LoRA run's adapters alone, as a PEFT adapter directory (default: the model with them merged).",
)


def main(argv):
  del argv  # parse_flags refuses stray arguments
  run_main(_main)


def _main():
  setup_logging()
  FLAGS = flags.FLAGS
  if FLAGS.adapter:
    loader = export_adapter(FLAGS.workdir, FLAGS.out, FLAGS.step)
    print(f'wrote {FLAGS.out}: load it onto its base with {loader}')
    return
  loader = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
  print(f'wrote {FLAGS.out}: load it with transformers.{loader}.from_pretrained({FLAGS.out!r})')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
