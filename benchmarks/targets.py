"""The speed targets, checked against the JSON records the benchmarks wrote (``benchmarks/RESULTS.md``, "Targets").

    python -m benchmarks.targets [--train benchmarks/results/train_throughput.json]
        [--decode benchmarks/results/decode.json]

Training (``python -m benchmarks.train_throughput``), every model and precision in the record: on a CPU our Linen
step at least :data:`VS_EAGER` times as fast as PyTorch eager's and :data:`VS_COMPILE` times ``torch.compile``'s,
timed side by side in that one run; on a GPU or TPU :data:`GPU_MFU_PCT` MFU in bf16 (against the datasheet peak).
Decoding on a CPU (``python -m benchmarks.decode``), at batch 1: bf16 weights at least :data:`BF16_OVER_F32` times
the float32 tokens/s of the same shape, and float32 GPT-2 small at :data:`PCT_OF_BOUND` percent of the bandwidth
bound. The records named are read; with none named, those at the default paths that exist. One that cannot be read
is one line and exit status 2. It prints the machine each record names and one line per target, and exits 1 when
one is not met; then, where the training record has them, what the product library gives (:func:`library_gains`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import XLA_PRODUCTS

VS_EAGER = 1.2
VS_COMPILE = 1.1
GPU_MFU_PCT = 50.0
BF16_OVER_F32 = 1.6
PCT_OF_BOUND = 65.0
TRAIN_PATH = 'benchmarks/results/train_throughput.json'
DECODE_PATH = 'benchmarks/results/decode.json'
_MACHINE_KEYS = (
  'cpu_model',
  'cpu_family',
  'cpu_model_number',
  'cpu_flags',
  'jax_backend',
  'devices',
)


class RecordError(ValueError):
  """A record that is missing, not JSON, or without the fields a target reads."""


@dataclass(frozen=True)
class Check:
  """One target: what it measures, the record's figure, and the least figure that meets it."""

  target: str
  measured: float
  threshold: float

  @property
  def met(self) -> bool:
    return self.measured >= self.threshold


def read_record(path: str, benchmark: str) -> dict:
  """The JSON record at ``path``, which ``benchmark`` must have written."""
  try:
    record = json.loads(Path(path).read_text())
  except OSError as error:
    raise RecordError(f'{path}: cannot be read ({error.strerror})') from None
  except json.JSONDecodeError as error:
    raise RecordError(f'{path}: not JSON ({error.msg}, line {error.lineno})') from None
  except UnicodeDecodeError:
    raise RecordError(f'{path}: not JSON (not UTF-8 text)') from None
  if not isinstance(record, dict) or record.get('benchmark') != benchmark:
    raise RecordError(f'{path}: not a record of benchmarks.{benchmark}')
  if not isinstance(record.get('rows'), list) or not isinstance(record.get('machine'), dict):
    raise RecordError(f'{path}: has no machine or rows')
  return record


def on_cpu(record: dict) -> bool:
  """The record's figures were measured on a CPU (its JAX backend)."""
  return record['machine'].get('jax_backend') in (None, 'cpu')


def _field(row: dict, key: str, path: str) -> float:
  value = row.get(key)
  if not isinstance(value, (int, float)):
    raise RecordError(
      f'{path}: a row of {row.get("model") or row.get("shape")} has no number {key!r}'
    )
  return float(value)


def timed_rows(record: dict) -> dict[tuple[str, str, str], dict]:
  """A training record's timed rows by ``(model, precision, impl)`` (a row that failed has an error, no step)."""
  return {
    (r['model'], r['precision'], r['impl']): r
    for r in record['rows']
    if isinstance(r, dict) and {'model', 'precision', 'impl', 'step_ms'} <= r.keys()
  }


def training_checks(record: dict, path: str) -> list[Check]:
  """On a CPU ours against PyTorch eager and ``torch.compile`` (where each was timed); on an accelerator the bf16
  MFU."""
  rows = timed_rows(record)
  ours = [(model, precision) for model, precision, impl in rows if impl == 'jax']
  if not ours:
    raise RecordError(f'{path}: has no timed row of ours (impl "jax")')
  checks = []
  for model, precision in ours:
    row = rows[model, precision, 'jax']
    if not on_cpu(record):
      if precision == 'bf16':
        mfu = _field(row, 'mfu_pct', path)
        checks.append(Check(f'{model} bf16 training MFU %', mfu, GPU_MFU_PCT))
      continue
    for impl, threshold in (('torch eager', VS_EAGER), ('torch.compile', VS_COMPILE)):
      if (peer := rows.get((model, precision, impl))) is not None:
        ratio = _field(peer, 'step_ms', path) / _field(row, 'step_ms', path)
        checks.append(Check(f'{model} {precision} training vs {impl}', ratio, threshold))
  if not checks:
    raise RecordError(
      f'{path}: has no row to check (a PyTorch row on a CPU, a bf16 row on an accelerator)'
    )
  return checks


def library_gains(record: dict, path: str) -> list[str]:
  """Where the record has ours with XLA's products too (``--xla-products``): per model and precision, XLA's step
  over ours, the speed-up the product library (MKL, oneDNN) gives on this CPU. No target: below 1, it costs here."""
  rows = timed_rows(record)
  return [
    f"{model} {precision}: the product library over XLA's products "
    f'{_field(row, "step_ms", path) / _field(rows[model, precision, "jax"], "step_ms", path):.2f}x'
    for (model, precision, impl), row in rows.items()
    if impl == XLA_PRODUCTS and (model, precision, 'jax') in rows
  ]


def decoding_checks(record: dict, path: str) -> list[Check]:
  """At batch 1: bf16 over float32 per shape, and float32 GPT-2 small against the bandwidth bound (CPU only)."""
  if not on_cpu(record):
    return []
  ours = [
    r
    for r in record['rows']
    if isinstance(r, dict) and r.get('impl') == 'jax' and r.get('batch') == 1
  ]
  checks = []
  for row in ours:
    if row.get('dtype') == 'bfloat16':
      measured = _field(row, 'vs_float32', path)
      checks.append(
        Check(f'{row.get("shape")} batch 1 decoding, bf16 over float32', measured, BF16_OVER_F32)
      )
    elif row.get('dtype') == 'float32' and row.get('shape') == 'gpt2-small':
      measured = _field(row, 'pct_of_bound', path)
      checks.append(
        Check('gpt2-small batch 1 float32 decoding, % of bound', measured, PCT_OF_BOUND)
      )
  if not checks:
    raise RecordError(f'{path}: has no batch-1 row of ours to check')
  return checks


def machine_line(record: dict) -> str:
  machine = record['machine']
  return '; '.join(f'{k}={machine[k]}' for k in _MACHINE_KEYS if k in machine)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--train', help=f'train_throughput record (default {TRAIN_PATH}, if there)')
  parser.add_argument('--decode', help=f'decode record (default {DECODE_PATH}, if there)')
  args = parser.parse_args(argv)
  sources = [
    (args.train, TRAIN_PATH, 'train_throughput', training_checks),
    (args.decode, DECODE_PATH, 'decode', decoding_checks),
  ]
  named = args.train is not None or args.decode is not None
  checks, notes = [], []
  try:
    for given, default, benchmark, read in sources:
      path = given if named else default
      if path is None or not (named or Path(path).exists()):
        continue
      record = read_record(path, benchmark)
      print(f'{path}: {machine_line(record)}')
      checks += read(record, path)
      if benchmark == 'train_throughput':
        notes = library_gains(record, path)
  except RecordError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if not checks:
    print(
      'error: no record to check (run the benchmarks, or name one with --train or --decode)',
      file=sys.stderr,
    )
    return 2
  width = max(len(c.target) for c in checks)
  for c in checks:
    verdict = 'met' if c.met else 'NOT MET'
    print(f'{c.target:<{width}}  {c.measured:8.2f}  (target {c.threshold:g})  {verdict}')
  unmet = sum(not c.met for c in checks)
  print(f'{len(checks) - unmet} of {len(checks)} targets met')
  for note in notes:
    print(note)
  return 1 if unmet else 0


if __name__ == '__main__':
  sys.exit(main())
