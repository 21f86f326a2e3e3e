"""Every mistake a user can make with ``python -m train`` and ``python -m train.sample`` ends in one clean message
and exit status 1: no traceback from our code or from a library's thread, and the workdir left as it was, so the
corrected command just works. Each case runs in fresh processes, several at once, so a race at exit shows."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from train_helpers import command_line, tiny_config, tiny_fields

from train.trainer import train_and_evaluate

pytestmark = pytest.mark.slow  # a few seconds of imports per process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# processes per case, run at the same time: a failure that races the trainer's threads shows in one of them
REPEATS = 3


def run_all(
  argv: list[str], count: int = REPEATS, env: dict | None = None
) -> list[subprocess.CompletedProcess]:
  """``count`` processes of ``python -m <argv>`` at once, each with its own result."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  procs = [
    subprocess.Popen(
      [sys.executable, '-m', *argv],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(count)
  ]
  return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def assert_clean_failure(results, message: str):
  for result in results:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert 'Traceback' not in output and 'Exception in thread' not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], output


def listing(path) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files
  )


def write(path, content, mode='w'):
  with open(path, mode) as f:
    f.write(content)
  return str(path)


TINY = command_line('lm', tiny_fields('lm'))

# (id, task, extra flags given the temp dir, expected part of the message)
BAD_INPUTS = [
  (
    'missing_file',
    'lm',
    lambda d: ['--config.data.path=' + str(d / 'missing.txt')],
    'does not exist',
  ),
  (
    'not_utf8',
    'lm',
    lambda d: ['--config.data.path=' + write(d / 'latin1.txt', b'ok\ncaf\xe9\n', 'wb')],
    'latin1.txt:2: not valid UTF-8',
  ),
  ('empty_file', 'lm', lambda d: ['--config.data.path=' + write(d / 'empty.txt', '')], 'is empty'),
  (
    'seq_len_over_max_len',
    'lm',
    lambda d: ['--config.data.seq_len=64'],
    'data.seq_len=64 exceeds model.max_len=16',
  ),
  (
    'bad_jsonl',
    'lm',
    lambda d: ['--config.data.path=' + write(d / 'docs.jsonl', '{"text": "a"}\n{"text": \n')],
    'docs.jsonl:2: not valid JSON',
  ),
  (
    'classify_short_row',
    'classify',
    lambda d: ['--config.data.path=' + write(d / 'rows.csv', 'good film,positive\nshort\n')],
    'rows.csv:2: expected "text,label"',
  ),
  (
    'classify_label_count',
    'classify',
    lambda d: [
      '--config.data.path='
      + write(d / 'rows.csv', ''.join(f'text {i},{"abc"[i % 3]}\n' for i in range(60)))
    ],
    'set --config.model.num_labels=3',
  ),
  (
    'translation_no_tab',
    'translation',
    lambda d: ['--config.data.path=' + write(d / 'pairs.tsv', 'one\teins\nno tab\n')],
    'pairs.tsv:2: no tab',
  ),
  (
    'heads_do_not_divide',
    'lm',
    lambda d: ['--config.model.num_heads=3'],
    'd_model=16 is not divisible by num_heads=3',
  ),
  (
    'negative_batch',
    'lm',
    lambda d: ['--config.batch_size=-2'],
    'batch_size must be a positive integer',
  ),
  ('unknown_schedule', 'lm', lambda d: ['--config.lr_schedule=step'], 'lr_schedule must be one of'),
  ('too_many_devices', 'lm', lambda d: ['--config.mesh.data=4'], '4 devices, but 1 are available'),
  (
    'unknown_field',
    'lm',
    lambda d: ['--config.model.depth=4'],
    'no config field --config.model.depth',
  ),
  (
    'bad_value',
    'lm',
    lambda d: ['--config.batch_size=many'],
    'flag --config.batch_size=many: invalid literal',
  ),
  (
    'missing_config_file',
    None,
    lambda d: ['--config=' + str(d / 'nope.py')],
    'cannot load the config file',
  ),
  ('stray_argument', 'lm', lambda d: ['train_more'], "unexpected arguments ['train_more']"),
]


@pytest.mark.parametrize(
  'task, extra, message', [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_creates_nothing(task, extra, message, tmp_path):
  workdir = tmp_path / 'work'
  # None: a case about the --config flag itself
  preset = command_line(task, tiny_fields(task)) if task else []
  argv = ['train', f'--workdir={workdir}', *preset, *extra(tmp_path)]
  # one process: these stop before the trainer starts a thread or opens a file, so there is no race to repeat
  assert_clean_failure(run_all(argv, count=1), message)
  assert not workdir.exists()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The workdir of a finished tiny run."""
  workdir = tmp_path_factory.mktemp('trained')
  train_and_evaluate(tiny_config(), str(workdir))
  return workdir


def test_a_workdir_of_another_config_is_one_line(trained):
  before = listing(trained)
  results = run_all(['train', f'--workdir={trained}', *TINY, '--config.model.d_ff=48'])
  assert_clean_failure(results, 'holds checkpoints of a run with another config')
  assert 'model.d_ff: checkpoint 32, now 48' in results[0].stderr
  assert listing(trained) == before


@pytest.mark.parametrize('part', ['state', 'meta'])
def test_an_unreadable_checkpoint_is_one_line(part, trained, tmp_path):
  """An unreadable meta fails in the read-only check before anything opens; an unreadable state fails after the
  run has opened its checkpoint manager (with the manager's background clean-up), so that close runs on this
  error path."""
  workdir = tmp_path / 'work'
  shutil.copytree(trained, workdir)
  for path in (workdir / 'checkpoints').rglob('*'):
    if path.is_file() and path.relative_to(workdir / 'checkpoints').parts[1] == part:
      path.write_bytes(path.read_bytes()[:2])
  results = run_all(['train', f'--workdir={workdir}', *TINY], count=2 * REPEATS)
  assert_clean_failure(results, f'no checkpoint in {workdir / "checkpoints"} can be read')


def test_sample_errors_are_one_line(trained, tmp_path):
  assert_clean_failure(run_all(['train.sample', f'--workdir={tmp_path}']), 'holds no training run')
  assert_clean_failure(run_all(['train.sample']), 'flag --workdir=None')


def test_verbose_shows_the_traceback(tmp_path):
  argv = [
    'train',
    f'--workdir={tmp_path / "w"}',
    *TINY,
    '--config.data.path=' + str(tmp_path / 'missing.txt'),
  ]
  for result in run_all([*argv, '--verbose'], count=1) + run_all(
    argv, count=1, env={'TRANSFORMER_JAX_VERBOSE': '1'}
  ):
    assert (
      result.returncode == 1
      and 'Traceback' in result.stderr
      and 'FileNotFoundError' in result.stderr
    )


def test_the_corrected_command_runs_after_a_failed_start(tmp_path):
  rows = tmp_path / 'rows.csv'
  write(rows, ''.join(f'text {i},{"ab"[i % 2]}\n' for i in range(40)) + 'broken row\n')
  argv = [
    'train',
    f'--workdir={tmp_path / "work"}',
    *command_line('classify', tiny_fields('classify')),
    f'--config.data.path={rows}',
  ]
  assert_clean_failure(run_all(argv, count=1), 'rows.csv:41: expected "text,label"')
  write(rows, ''.join(f'text {i},{"ab"[i % 2]}\n' for i in range(40)))
  result = run_all(argv, count=1)[0]
  assert result.returncode == 0, result.stderr
  with open(tmp_path / 'work' / 'labels.json') as f:
    assert json.load(f) == {'names': ['a', 'b']}
