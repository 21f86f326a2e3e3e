"""A run read back from its workdir, for using it after training (``train.sample``), and written out as a Hugging
Face model directory (``train.export``)."""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections

from train import adapters
from train.checkpoint import Checkpoints
from train.optim import make_optimizer
from train.steps import create_state
from train.tasks import ClassificationTask, build_task
from train.vocab import TokenizerVocab
from transformer_jax import lora, pretrained
from transformer_jax.convert.peft import save_peft
from transformer_jax.models import GPT, BERTForMaskedLM, Transformer
from transformer_jax.pretrained_seq2seq import Seq2SeqPretrained


def load_run(workdir: str, step: int | None = None):
  """``(task, params)`` of the newest restorable checkpoint in ``workdir`` (or of ``step``), with the config,
  vocabulary and labels saved beside it; a LoRA run's adapters merged into its base."""
  task, state = load_state(workdir, step)
  return task, adapters.full_params(state, task.lora)


def load_state(workdir: str, step: int | None = None):
  """``(task, train state)`` of the checkpoint :func:`load_run` reads; a LoRA run's frozen weights rebuilt from
  its base."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'{workdir} holds no training run (no config.json); train one with '
      f'python -m train --workdir={workdir}'
    )
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = build_task(config, workdir)
  # shapes only, on one device: nothing is initialised just to be overwritten
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  create = functools.partial(create_state, task, make_optimizer(config)[0], config.seed)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), jax.eval_shape(create)
  )
  with Checkpoints.reader(workdir) as checkpoints:
    saved, meta = checkpoints.restore(adapters.saved_part(abstract), step)
  if meta is None:
    raise FileNotFoundError(f'no checkpoint to restore in {workdir}')
  frozen = {}
  if task.lora is not None:  # the frozen weights, from the base the run started from
    fresh = jax.jit(create)()
    frozen = adapters.with_base(fresh, task.start_params(adapters.base_params(fresh))).frozen
  return task, adapters.restored(saved, frozen)


# What loads each kind of model again.
_LOADERS = {
  GPT: 'AutoModelForCausalLM',
  BERTForMaskedLM: 'AutoModelForMaskedLM',
  Transformer: 'AutoModelForSeq2SeqLM',
}


def export_adapter(workdir: str, out: str, step: int | None = None) -> str:
  """Writes a LoRA run's adapters to ``out`` as a PEFT adapter directory; returns how to load it."""
  task, state = load_state(workdir, step)
  if task.lora is None:
    raise ValueError(f'{workdir} is no LoRA run (lora.rank is 0): it has no adapters to export')
  if jax.tree.leaves(state.params['params']):
    raise ValueError(
      f'{workdir} also trains whole modules ({", ".join(state.params["params"])}), which this PEFT export does '
      'not write; export the merged weights instead (without --adapter)'
    )
  save_peft(task.model, state.params[lora.COLLECTION], task.lora, out, task.config.init_from)
  return f'peft.PeftModel.from_pretrained(base_model, {out!r})'


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the run in ``workdir`` to ``out`` (a LoRA run's adapters merged); returns the name of the
  ``transformers`` class that loads it."""
  task, params = load_run(workdir, step)
  vocab = getattr(task, 'vocab', None) or task.src_vocab
  if not isinstance(vocab, TokenizerVocab):
    raise ValueError(
      f'{workdir} trains with its own {vocab.kind!r} vocabulary, which has no Hugging Face tokenizer; '
      'runs started from a Hugging Face model (init_from) export'
    )
  labels = None
  if isinstance(task, ClassificationTask):
    labels = tuple(task.labels.name(i) for i in range(task.num_labels))
  params, start = jax.device_get(params), task.pretrained
  if isinstance(task.model, Transformer):  # with the settings it decodes with
    checkpoint = Seq2SeqPretrained(
      task.model, params, vocab.tokenizer, start.generation, start.hf_config
    )
  else:
    checkpoint = pretrained.Pretrained(task.model, params, vocab.tokenizer, start.hf_config, labels)
  checkpoint.save(out)
  return _LOADERS.get(type(task.model), 'AutoModelForSequenceClassification')
