"""The trainer's metric writer: TensorBoard events and ``metrics.jsonl`` without loading PyTorch."""

import subprocess
import sys

from train.metrics import MetricWriter, read_metrics

SCRIPT = """
import sys
from train.metrics import MetricWriter
with MetricWriter(sys.argv[1], start_step=0) as writer:
  writer.write(1, 'train', {'loss': 2.5})
print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
"""


def test_a_fresh_process_writes_events_without_importing_torch(tmp_path):
  done = subprocess.run(
    [sys.executable, '-c', SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == '[]'
  assert read_metrics(str(tmp_path)) == [{'step': 1, 'split': 'train', 'loss': 2.5}]
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))


def test_a_process_with_torch_loaded_writes_both_files(tmp_path):
  import torch  # noqa: F401  (loaded first, as in a process that converts checkpoints)

  with MetricWriter(str(tmp_path), start_step=0) as writer:
    writer.write(1, 'eval', {'loss': 1.5})
    writer.write(2, 'eval', {'loss': 1.25})
  assert [r['loss'] for r in read_metrics(str(tmp_path))] == [1.5, 1.25]
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
