"""``python -m benchmarks.targets``: each target read from the records, met or not by its threshold, the exit status
saying whether all were met, and a record it cannot read one line with status 2."""

import json

import pytest

from benchmarks import targets


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
  """Away from the checkout, whose default records would otherwise be read where none is named."""
  monkeypatch.chdir(tmp_path)


CPU = {'cpu_model': 'AMD EPYC', 'cpu_family': '26', 'jax_backend': 'cpu', 'devices': ['cpu']}
GPU = {'jax_backend': 'gpu', 'devices': ['NVIDIA H100']}


def train_record(machine, steps):
  """``steps``: {(model, precision): {impl: step_ms}}, as benchmarks.train_throughput writes them."""
  rows = [
    {
      'model': m,
      'precision': p,
      'impl': impl,
      'step_ms': ms,
      'mfu_pct': 3e4 / ms if ms != 'fast' else 0,
    }
    for (m, p), impls in steps.items()
    for impl, ms in impls.items()
  ]
  rows.append(
    {'model': 'gpt', 'precision': 'f32', 'impl': 'torch.compile', 'error': 'BackendCompilerFailed'}
  )
  return {'benchmark': 'train_throughput', 'machine': machine, 'rows': rows}


def decode_record(machine, bf16_over_f32, pct_of_bound):
  """Per shape, as benchmarks.decode writes them: transformers' row, ours in both dtypes at batch 1, and a batch-8
  row that no target reads."""
  rows = []
  for shape in ('gpt2-small', 'small'):
    at_one = dict(shape=shape, batch=1, impl='jax')
    rows += [
      dict(shape=shape, batch=1, impl='transformers', dtype='float32', pct_of_bound=40.0),
      dict(at_one, dtype='float32', vs_float32=1.0, pct_of_bound=pct_of_bound[shape]),
      dict(at_one, dtype='bfloat16', vs_float32=bf16_over_f32[shape]),
      dict(shape=shape, batch=8, impl='jax', dtype='bfloat16', vs_float32=1.0),
    ]
  return {'benchmark': 'decode', 'machine': machine, 'rows': rows}


def write(path, record):
  path.write_text(json.dumps(record))
  return str(path)


def verdicts(output: str) -> dict:
  """{target: (measured, verdict)} from the printed lines."""
  found = {}
  for line in output.splitlines():
    if '(target ' in line:
      head, verdict = line.rsplit(')', 1)
      target, measured = head.split('(target ')[0].rsplit(None, 1)
      found[target.strip()] = (float(measured), verdict.strip())
  return found


STEPS = {
  ('gpt', 'f32'): {
    'jax': 500,
    'jax nnx': 510,
    'torch eager': 650,
    'torch sdpa': 520,
    'torch.compile': 540,
  },
  ('seq2seq', 'bf16'): {'jax': 800, 'torch eager': 1000, 'torch.compile': 920},
}


def test_training_ratios_against_each_threshold(tmp_path, capsys):
  status = targets.main(['--train', write(tmp_path / 't.json', train_record(CPU, STEPS))])
  found = verdicts(capsys.readouterr().out)
  assert found == {
    'gpt f32 training vs torch eager': (1.3, 'met'),
    'gpt f32 training vs torch.compile': (1.08, 'NOT MET'),  # 540 / 500, under 1.1
    'seq2seq bf16 training vs torch eager': (1.25, 'met'),
    'seq2seq bf16 training vs torch.compile': (1.15, 'met'),
  }
  assert status == 1


def test_all_met_exits_zero_and_counts(tmp_path, capsys):
  steps = {('bert', 'bf16'): {'jax': 400, 'torch eager': 490, 'torch.compile': 441}}
  status = targets.main(['--train', write(tmp_path / 't.json', train_record(CPU, steps))])
  out = capsys.readouterr().out
  assert status == 0
  assert 'cpu_family=26' in out and '2 of 2 targets met' in out


def test_a_failed_peer_row_is_no_target(tmp_path, capsys):
  """A ``torch.compile`` that failed leaves an error row, not a ratio to check."""
  steps = {('gpt', 'f32'): {'jax': 500, 'torch eager': 700}}
  assert targets.main(['--train', write(tmp_path / 't.json', train_record(CPU, steps))]) == 0
  assert list(verdicts(capsys.readouterr().out)) == ['gpt f32 training vs torch eager']


def test_on_a_gpu_only_the_bf16_mfu(tmp_path, capsys):
  steps = {('gpt', 'bf16'): {'jax': 500, 'torch eager': 100}, ('gpt', 'f32'): {'jax': 900}}
  status = targets.main(['--train', write(tmp_path / 't.json', train_record(GPU, steps))])
  assert verdicts(capsys.readouterr().out) == {'gpt bf16 training MFU %': (60.0, 'met')}
  assert status == 0
  steps = {('gpt', 'bf16'): {'jax': 700}}
  assert targets.main(['--train', write(tmp_path / 't.json', train_record(GPU, steps))]) == 1
  assert verdicts(capsys.readouterr().out) == {'gpt bf16 training MFU %': (42.86, 'NOT MET')}


def test_decoding_targets_at_batch_one(tmp_path, capsys):
  record = decode_record(
    CPU, {'gpt2-small': 1.9, 'small': 1.55}, {'gpt2-small': 64.0, 'small': 20.0}
  )
  status = targets.main(['--decode', write(tmp_path / 'd.json', record)])
  assert verdicts(capsys.readouterr().out) == {
    'gpt2-small batch 1 float32 decoding, % of bound': (64.0, 'NOT MET'),
    'gpt2-small batch 1 decoding, bf16 over float32': (1.9, 'met'),
    'small batch 1 decoding, bf16 over float32': (1.55, 'NOT MET'),
  }
  assert status == 1


def test_default_paths_where_none_is_named(tmp_path, capsys):
  (tmp_path / 'benchmarks' / 'results').mkdir(parents=True)
  write(
    tmp_path / targets.TRAIN_PATH, train_record(CPU, {('gpt', 'f32'): {'jax': 1, 'torch eager': 2}})
  )
  assert targets.main([]) == 0  # the decode record is not there: skipped
  assert len(verdicts(capsys.readouterr().out)) == 1
  record = decode_record(
    CPU, {'gpt2-small': 2.0, 'small': 2.0}, {'gpt2-small': 90.0, 'small': 90.0}
  )
  write(tmp_path / targets.DECODE_PATH, record)
  assert targets.main([]) == 0
  assert len(verdicts(capsys.readouterr().out)) == 4
  assert targets.main(['--train', targets.TRAIN_PATH]) == 0  # one named: only that one
  assert len(verdicts(capsys.readouterr().out)) == 1


@pytest.mark.parametrize(
  'name, text, message',
  [
    ('missing', None, 'cannot be read'),
    ('not_json', '{"rows": [', 'not JSON'),
    ('not_text', b'\x89PNG\r\n\x1a\n\xff\xfe', 'not UTF-8 text'),
    (
      'other_benchmark',
      json.dumps({'benchmark': 'decode', 'machine': {}, 'rows': []}),
      'not a record of',
    ),
    (
      'no_rows',
      json.dumps({'benchmark': 'train_throughput', 'machine': {}}),
      'has no machine or rows',
    ),
    (
      'no_row_of_ours',
      json.dumps(train_record(CPU, {('gpt', 'f32'): {'torch eager': 5}})),
      'no timed row of ours',
    ),
    (
      'step_not_a_number',
      json.dumps(train_record(CPU, {('gpt', 'f32'): {'jax': 'fast', 'torch eager': 5}})),
      "no number 'step_ms'",
    ),
  ],
)
def test_a_bad_record_is_one_line_and_status_two(tmp_path, capsys, name, text, message):
  path = tmp_path / f'{name}.json'
  if isinstance(text, bytes):
    path.write_bytes(text)
  elif text is not None:
    path.write_text(text)
  assert targets.main(['--train', str(path)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err and err.startswith('error: ')


def test_nothing_to_check_is_status_two(capsys):
  assert targets.main([]) == 2
  assert 'no record to check' in capsys.readouterr().err


def test_library_gain_is_printed_and_no_target(tmp_path, capsys):
  """With ``--xla-products`` rows: XLA's step over ours per model and precision, which decides no exit status."""
  steps = {
    ('seq2seq', 'bf16'): {'jax': 800, targets.XLA_PRODUCTS: 1000, 'torch eager': 1000},
    ('gpt', 'f32'): {'jax': 500, targets.XLA_PRODUCTS: 400, 'torch eager': 700},
    ('bert', 'f32'): {'jax': 500, 'torch eager': 700},
  }
  assert targets.main(['--train', write(tmp_path / 't.json', train_record(CPU, steps))]) == 0
  out = capsys.readouterr().out
  assert "seq2seq bf16: the product library over XLA's products 1.25x" in out
  assert "gpt f32: the product library over XLA's products 0.80x" in out
  assert 'bert f32: the product' not in out
  assert len(verdicts(out)) == 3  # XLA's row is no peer to check against
