"""Where metrics go: TensorBoard scalars and ``metrics.jsonl`` in the workdir (one JSON object per line)."""

from __future__ import annotations

import json
import os
import sys

METRICS_FILE = 'metrics.jsonl'


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl``: ``{'step': ..., 'split': 'train' | 'eval', <metric>: value, ...}``."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summary_writer_class():
  """tensorboardX's ``SummaryWriter``, imported here (not at the top) and without PyTorch where it is not loaded yet.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors, which we never pass: about two
  seconds of every start. Hidden while tensorboardX loads, ``import torch`` fails there and it takes numpy only."""
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules['torch'] = None  # an entry of None makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """Writes ``{name: float}`` per step and split to TensorBoard (``workdir/tensorboard``) and ``metrics.jsonl``.

  Opened for a run resuming at ``start_step``, it first drops the records past that step (written after the last
  checkpoint of a killed run), so the file reads as one uninterrupted run. With ``enabled=False`` (every process
  but the first of a multi-process run) it writes nothing.
  """

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    path = os.path.join(workdir, METRICS_FILE)
    kept = [r for r in read_metrics(workdir) if r['step'] <= start_step]
    with open(path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    self.jsonl = open(path, 'a')
    self.tensorboard = summary_writer_class()(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self.tensorboard.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.jsonl.close()
    self.tensorboard.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
