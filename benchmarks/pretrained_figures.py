"""The figures of fine-tuning from Hugging Face checkpoints and of the encoder-decoder conversions, printed.

    python -m benchmarks.pretrained_figures [--part fine_tuning|seq2seq_logits|decoder_logits|all]

``fine_tuning``: tiny random BERT and GPT-2 checkpoints saved by transformers (the models, tokenizers and data of
``tests/test_init_from.py``) fine-tuned by ``train_and_evaluate`` as ``classify``, ``lm`` and ``mlm``: the held-out
metrics of the start and of the end, then the export reloaded by transformers (its logits against ours, and the
pipeline's labels on 64 new texts). ``seq2seq_logits``: the largest logit difference from transformers of each
BART and Marian model of ``tests/test_bart_marian.py``, on its padded batch. ``decoder_logits``: the same for the
Llama, Mistral and Qwen2 models of ``tests/test_llama.py``, and for LoRA adapters against peft. No download;
transformers, torch and peft are needed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')


def _start_metrics(config, root: Path) -> dict:
  import jax

  from train.steps import eval_step_fn, evaluate
  from train.tasks import build_task
  from transformer_jax.convert import load_hf

  task = build_task(config, str(root / f'probe-{config.task}'))
  _, start = load_hf(config.init_from)
  return evaluate(jax.jit(eval_step_fn(task)), start, task.eval_batches(), task.token_level)


def fine_tuning(root: Path) -> None:
  import numpy as np
  import test_init_from as t
  import torch
  import transformers

  from train.runs import export, load_run
  from train.trainer import train_and_evaluate

  torch.manual_seed(0)
  bert, gpt2 = t._bert_tokenizer(), t._gpt2_tokenizer()
  end = gpt2.eos_token_id
  gpt2_config = transformers.GPT2Config(
    vocab_size=len(gpt2) + 4, n_positions=40, n_embd=12, n_layer=2, n_head=3, bos_token_id=end,
    eos_token_id=end,
  )  # fmt: skip
  made = {
    'classifier': (transformers.BertForSequenceClassification(t.bert_config(bert)), bert),
    'mlm': (transformers.BertForMaskedLM(t.bert_config(bert)), bert),
    'gpt2': (transformers.GPT2LMHeadModel(gpt2_config), gpt2),
  }
  for name, (model, tok) in made.items():
    model.save_pretrained(root / name)
    tok.save_pretrained(root / name)
  (root / 'reviews.csv').write_text(''.join(f'{x},{y}\n' for x, y in t.reviews(160)))
  (root / 'corpus.txt').write_text(t.corpus())
  runs = {
    'classify': (
      'classifier',
      'AutoModelForSequenceClassification',
      dict(batch_size=16, learning_rate=2e-2, param_lr='classifier=5e-2,bert/encoder/layers_0=0')
      | {'data.path': str(root / 'reviews.csv'), 'data.seq_len': 12, 'num_train_steps': 40},
    ),
    'lm': ('gpt2', 'AutoModelForCausalLM', {'data.path': str(root / 'corpus.txt')}),
    'mlm': ('mlm', 'AutoModelForMaskedLM', {'data.path': str(root / 'corpus.txt')}),
  }
  texts = {
    'classify': [x for x, _ in t.reviews(64, seed=7)],
    'lm': ['the film was good', 'our trip was dull today'],
    'mlm': ['the film was [MASK] today', 'our [MASK] was dull'],
  }
  for task, (source, loader, overrides) in runs.items():
    steps = overrides.pop('num_train_steps', 30)
    intervals = dict(eval_every_steps=steps, checkpoint_every_steps=steps, eval_batches=0)
    config = t.config_from(task, root / source, num_train_steps=steps, **intervals, **overrides)
    before = _start_metrics(config, root)
    started = time.perf_counter()
    summary = train_and_evaluate(config, str(root / f'{task}-run'))
    print(f'{task}: {steps} steps in {time.perf_counter() - started:.1f} s')
    print(f'  held-out at the start: {before}')
    print(f'  held-out at the end:   {summary["eval"]}')
    out = root / f'{task}-hf'
    export(str(root / f'{task}-run'), str(out))
    run_task, params = load_run(str(root / f'{task}-run'))
    hf_model = getattr(transformers, loader).from_pretrained(out).eval()
    ids, mask = t.hf_inputs(out, texts[task])
    difference = t.max_logit_difference(run_task.model, params, hf_model, ids, mask)
    print(f'  export in transformers.{loader}: largest logit difference {difference:.2e}')
    if task == 'classify':
      encoded = run_task.encode_texts(texts[task])
      ours = [run_task.labels.name(int(i)) for i in run_task.predict(params, encoded).argmax(-1)]
      pipe = transformers.pipeline('text-classification', model=str(out))
      theirs = [r['label'] for r in pipe(texts[task])]
      gold = [y for _, y in t.reviews(64, seed=7)]
      same = sum(a == b for a, b in zip(ours, theirs))
      print(
        f'  64 new texts: pipeline label equal to ours {same}/64; accuracy {np.mean(np.equal(ours, gold)):.3f}'
      )


def seq2seq_logits(root: Path) -> None:
  import numpy as np
  import test_bart_marian as t
  import torch

  from transformer_jax.convert import load_hf

  for name, (cls, config) in t.MODELS.items():
    torch.manual_seed(0)
    model = t._perturbed(cls(config))
    if hasattr(model, 'final_logits_bias'):
      with torch.no_grad():
        model.final_logits_bias[0, config.eos_token_id] += t.EOS_BOOST[name.split('_')[0]]
    model.save_pretrained(root / name)
  for name in t.HEADED:
    model, params = load_hf(root / name)
    batch = t._batch(model.config)
    with torch.no_grad():
      theirs = t._theirs(t._hf(root, name), *batch).logits.numpy()
    real = batch[3]
    difference = np.abs(t._ours(model, params, *batch)[real] - theirs[real]).max()
    print(f'{name}: largest logit difference from transformers {difference:.2e}')


def decoder_logits(root: Path) -> None:
  """Llama, Mistral and Qwen2 (``tests/test_llama.py``): logits and gradients against transformers; LoRA adapters
  against peft (``tests/test_lora.py``)."""
  import jax
  import numpy as np
  import peft
  import test_llama as t
  import test_lora as tl
  import torch

  from transformer_jax import lora
  from transformer_jax.convert import load_hf, save_peft

  for name in t.MODELS:
    t._hf_model(name).save_pretrained(root / name)
    model, params = load_hf(root / name)
    ids, positions = t._batch()
    with jax.default_matmul_precision('highest'):
      ours = np.asarray(t._ours(model, params, ids, positions))
    with torch.no_grad():
      theirs = t._theirs(t._load_hf_model(root / name), ids, positions).numpy()
    difference = np.abs(ours[t.VALID] - theirs[t.VALID]).max()
    print(
      f'{name}: largest logit difference from transformers {difference:.2e} (left-padded batch of 13)'
    )
  for family, (make, settings) in tl.FAMILIES.items():
    make().save_pretrained(root / f'{family}_base')
    model, params = load_hf(root / f'{family}_base')
    ids = tl._ids()
    made = tl._perturbed(lora.init(model, params, settings, jax.random.key(1), ids))
    save_peft(model, made, settings, root / f'{family}_adapter')
    hf = tl.transformers.AutoModelForCausalLM.from_pretrained(root / f'{family}_base')
    hf = peft.PeftModel.from_pretrained(hf, root / f'{family}_adapter').eval()
    options = dict(valid=tl.VALID, positions=tl._positions())
    with jax.default_matmul_precision('highest'):
      ours = np.asarray(lora.apply(model, params, made, settings, ids, **options))
    with torch.no_grad():
      theirs = hf(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(tl.VALID.astype(np.int64)),
        position_ids=torch.tensor(tl._positions()),
      ).logits.numpy()
    difference = np.abs(ours[tl.VALID] - theirs[tl.VALID]).max()
    print(
      f'{family} + LoRA rank {settings.rank}: largest logit difference from peft {difference:.2e}'
    )


PARTS = {
  'fine_tuning': fine_tuning,
  'seq2seq_logits': seq2seq_logits,
  'decoder_logits': decoder_logits,
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--part', choices=[*PARTS, 'all'], default='all')
  args = parser.parse_args(argv)
  sys.path.insert(0, TESTS)  # the tests' tiny models and tokenizers
  for name, part in PARTS.items():
    if args.part in (name, 'all'):
      with tempfile.TemporaryDirectory() as root:
        part(Path(root))


if __name__ == '__main__':
  main()
