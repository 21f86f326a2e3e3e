"""Writes the checkpoints that ``tests/test_checkpoint_compat.py`` restores: tiny runs of every task and model
family, and the held-out loss each run ended at.

    python tests/data/write_checkpoints.py   # from the repository root; rewrites tests/data/checkpoints/

Re-run it only when a change of the parameter trees is intended (and then say so: old checkpoints stop restoring).
"""

import json
import os
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from train_helpers import tiny_config  # noqa: E402

from train.trainer import train_and_evaluate  # noqa: E402

ROOT = pathlib.Path(__file__).parent / 'checkpoints'

# name -> (task, overrides on the tiny config): each model family, and GPT with learned and with rotary positions.
RUNS = {
    'gpt_rotary': ('lm', {}),
    'gpt_learned_scanned': ('lm', {'model.position_encoding': 'learned', 'model.rope_theta': None,
                                   'model.scan_layers': True, 'model.num_layers': 2}),
    'transformer': ('translation', {}),
    'bert_classify': ('classify', {}),
    'bert_mlm': ('mlm', {}),
}
COMMON = {'num_train_steps': 3, 'eval_every_steps': 3, 'checkpoint_every_steps': 3, 'keep_last': 1}


def main():
  shutil.rmtree(ROOT, ignore_errors=True)
  expected = {}
  for name, (task, overrides) in RUNS.items():
    workdir = ROOT / name
    summary = train_and_evaluate(tiny_config(task, **COMMON, **overrides), str(workdir))
    for bulky in ('data', 'tensorboard', 'metrics.jsonl'):  # the corpus cache and logs: only the checkpoint matters
      path = workdir / bulky
      shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    expected[name] = {'task': task, 'overrides': {**COMMON, **overrides}, 'eval': summary['eval']}
  (ROOT / 'expected.json').write_text(json.dumps(expected, indent=1, sort_keys=True) + '\n')
  print(os.popen(f'du -sh {ROOT}').read().strip())


if __name__ == '__main__':
  main()
