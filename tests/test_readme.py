"""Every shell command in README.md runs as written.

The commands of the README's ```bash blocks (continuation lines joined, comments dropped, each part of an ``&&``
chain on its own) and the ``!`` lines of the notebooks each run in a subprocess, all in one sandbox directory that
stands for the checkout: ``train/configs`` is there, the data files the commands name are written there, and the
Hugging Face checkpoints they start from (``path/to/gpt2``...) are tiny ones saved by transformers at those very
paths, with tokenizers trained here. Training commands get overrides appended that shrink them to seconds (steps,
intervals, the batch, and the model where it is not pretrained), for the fields the command does not set itself. A
command for several devices runs on as many simulated CPU devices, one for several hosts as two processes on
127.0.0.1. A command fails when it exits non-zero or prints a traceback. What cannot run here is in ``NOT_RUN``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import transformers
from test_init_from import _bert_tokenizer, _gpt2_tokenizer, bert_config, corpus, reviews
from test_translation_init_from import SHAPE, _marian_tokenizer, pairs
from train_helpers import tiny_fields

from train.pretrained_start import RUNTIME_FIELDS

pytestmark = pytest.mark.slow  # a process per command

REPO = Path(__file__).resolve().parent.parent

# Commands that do not run here, by how they start, with the reason.
NOT_RUN = {
  'pip install': 'installs from the network',
  'ruff ': 'the lint of CI, whose script (.ci/run) runs this README line as written',
  'python -m pytest': 'the test suite, this test included (.ci/run runs it)',
  'gcloud compute tpus': 'needs a Cloud TPU pod slice (distributed.enabled finds the processes through it)',
  'python -m benchmarks.': 'measures full-size models against PyTorch and torch.compile for minutes by design',
  'bash benchmarks/gpu_check.sh': 'needs a GPU (test_benchmark_cases.py checks that it stops on a CPU)',
  'bash benchmarks/cpu_check.sh': 'the training and decoding benchmarks in full, ten minutes by design',
}


def _corpus_folder(path: Path):
  path.mkdir()
  for name in ('a.txt', 'b.txt'):
    (path / name).write_text(corpus())


# The data files the commands name, written into the sandbox before a command that names one runs.
DATA = {
  'reviews.csv': lambda path: path.write_text(
    ''.join(f'{t},{label}\n' for t, label in reviews(160))
  ),
  # long enough for a validation window of the 256 tokens the GPT-2 fine-tuning asks for
  'my_corpus.txt': lambda path: path.write_text(corpus() * 10),
  'my_corpus/': _corpus_folder,
  'pairs.tsv': lambda path: path.write_text(''.join(f'{s}\t{t}\n' for s, t in pairs(240))),
}


def _bert(path: Path):
  """bert-base-uncased's kind: a masked LM with a WordPiece tokenizer."""
  tok = _bert_tokenizer()
  transformers.BertForMaskedLM(bert_config(tok, max_position_embeddings=64)).save_pretrained(path)
  tok.save_pretrained(path)


def _gpt2(path: Path):
  tok = _gpt2_tokenizer()
  end = tok.eos_token_id
  # 256 positions: the sequence length of the fine-tuning command
  shape = dict(n_positions=256, n_embd=12, n_layer=2, n_head=3)
  config = transformers.GPT2Config(vocab_size=len(tok), bos_token_id=end, eos_token_id=end, **shape)
  transformers.GPT2LMHeadModel(config).save_pretrained(path)
  tok.save_pretrained(path)


def _llama(path: Path):
  tok = _gpt2_tokenizer()
  config = transformers.LlamaConfig(
    vocab_size=len(tok),
    hidden_size=24,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=28,
    num_hidden_layers=2,
    max_position_embeddings=64,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  tok.save_pretrained(path)


def _marian(path: Path):
  path.mkdir(parents=True)
  tok = _marian_tokenizer(path)
  ids = dict(pad_token_id=len(tok) - 1, decoder_start_token_id=len(tok) - 1, eos_token_id=0)
  config = transformers.MarianConfig(
    vocab_size=len(tok),
    activation_function='swish',
    **ids,
    **{**SHAPE, 'max_position_embeddings': 128},  # the command's src_len and tgt_len
  )
  transformers.MarianMTModel(config).save_pretrained(path)
  tok.save_pretrained(path)


# The checkpoints the commands start from, built at ``path/to/<name>`` in the sandbox when a command names one.
CHECKPOINTS = {'bert': _bert, 'gpt2': _gpt2, 'llama': _llama, 'opus-mt-en-de': _marian}

# The multi-host command runs as this many processes on 127.0.0.1, each with this many devices.
PROCESSES, DEVICES_PER_HOST = 2, 2


@dataclasses.dataclass(frozen=True)
class Command:
  text: str  # as the README has it (one line)
  env: tuple[tuple[str, str], ...]  # NAME=value words before the program
  argv: tuple[str, ...]

  @property
  def module(self) -> str | None:
    return self.argv[2] if self.argv[:2] == ('python', '-m') else None

  def flags(self) -> dict[str, str]:
    return dict(a[2:].split('=', 1) for a in self.argv if a.startswith('--') and '=' in a)

  @property
  def fields(self) -> dict[str, str]:
    """The ``--config.<field>`` values it sets."""
    return {k[len('config.') :]: v for k, v in self.flags().items() if k.startswith('config.')}

  @property
  def task(self) -> str:
    preset = self.flags().get('config', 'train/configs/default.py')
    name = Path(preset).stem
    return 'lm' if name == 'default' else name

  @property
  def workdir(self) -> str:
    default = f'runs/{self.task}' if self.module == 'train' else None
    return self.flags().get('workdir', default)

  @property
  def processes(self) -> int:
    return PROCESSES if 'distributed.process_id' in self.fields else 1


def _commands(text: str) -> list[str]:
  """Continuation lines joined, comments dropped, one entry per part of an ``&&`` chain."""
  commands = []
  for line in text.replace('\\\n', ' ').splitlines():
    words = shlex.split(line, comments=True)
    while words:
      part = words[: words.index('&&')] if '&&' in words else words
      commands.append(shlex.join(part))
      words = words[len(part) + 1 :]
  return commands


def readme_commands() -> list[Command]:
  texts = []
  readme = (REPO / 'README.md').read_text()
  for block in re.findall(r'^```bash\n(.*?)^```', readme, flags=re.S | re.M):
    texts += _commands(block)
  for notebook in sorted((REPO / 'notebooks').glob('*.ipynb')):
    for cell in json.loads(notebook.read_text())['cells']:
      if cell['cell_type'] == 'code':
        lines = ''.join(cell['source']).splitlines()
        texts += [c for line in lines if line.lstrip().startswith('!') for c in _commands(line[1:])]
  commands = []
  for text in dict.fromkeys(texts):  # `python -m train` is there twice
    words = shlex.split(text)
    env = [w for w in words if re.fullmatch(r'[A-Z_][A-Z0-9_]*=.*', w)]
    words = words[len(env) :]
    commands.append(Command(text, tuple(tuple(w.split('=', 1)) for w in env), tuple(words)))
  return commands


COMMANDS = readme_commands()
SAMPLE = next(c for c in COMMANDS if c.module == 'train.sample')
TIMEOUT = 300  # seconds a command may take


def not_run(command: Command) -> str | None:
  return next((why for start, why in NOT_RUN.items() if command.text.startswith(start)), None)


def marks(command: Command) -> list:
  return [pytest.mark.skip(reason=not_run(command))] if not_run(command) else []


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def shrunk(command: Command) -> list[str]:
  """The overrides that make a training command take seconds: steps, intervals and the batch, and the model's size
  unless it comes from ``init_from`` (whose architecture may not change); fields the command sets stay its own."""
  fields = {
    **tiny_fields(command.task),
    'num_train_steps': 2,
    'warmup_steps': 1,
    'eval_every_steps': 2,
    'checkpoint_every_steps': 2,
  }
  if 'init_from' in command.fields:
    fields = {
      k: v
      for k, v in fields.items()
      if not k.startswith('model.') or k.split('.')[1] in RUNTIME_FIELDS
    }
  return [f'--config.{k}={v}' for k, v in fields.items() if k not in command.fields]


def device_count(command: Command) -> int:
  """The devices a command's mesh asks for on one host (its GPUs), to simulate on the CPU; 1 for none."""
  sizes = [int(v) for k, v in command.fields.items() if k.startswith('mesh.')]
  if command.processes > 1 or any(s < 0 for s in sizes):
    return DEVICES_PER_HOST
  return math.prod(sizes)


class Sandbox:
  """The directory the commands run in, and the runs of the commands, each started once and run two at a time
  (a run is mostly imports and compiles on one core)."""

  def __init__(self, root: Path):
    self.root = root
    (root / 'train').mkdir()
    # the presets, at the path the commands give; `train` itself is imported from the checkout
    (root / 'train' / 'configs').symlink_to(REPO / 'train' / 'configs')
    self.pool = concurrent.futures.ThreadPoolExecutor(2)
    self.jobs: dict[tuple, concurrent.futures.Future] = {}
    self.lock = threading.RLock()
    self.preparing = threading.Lock()

  def prepare(self, command: Command):
    """Writes the data files and builds the checkpoints that ``command`` names."""
    with self.preparing:  # once each, whichever command asks first
      for word in command.argv:
        for name, write in DATA.items():
          path = self.root / name
          if f'={name}' in word and not path.exists():
            write(path)
        for name, build in CHECKPOINTS.items():
          path = self.root / 'path' / 'to' / name
          if f'=path/to/{name}' in word and not path.exists():
            build(path)

  def placed(self, word: str, process: int, coordinator: str) -> str:
    """``word`` of the multi-host command on this machine: the coordinator, the process count and id, and the
    shared directory in the sandbox."""
    for placeholder, value in (
      ('host0:1234', coordinator),
      ('/shared/', f'{self.root}/shared/'),
      ('num_processes=N', f'num_processes={PROCESSES}'),
      ('process_id=i', f'process_id={process}'),
    ):
      word = word.replace(placeholder, value)
    return word

  def start(self, command: Command, extra: tuple[str, ...] = ()) -> concurrent.futures.Future:
    """The run of ``command`` (with ``extra`` arguments), started now unless it was; a command that reads a workdir
    starts the command that trains it first."""
    with self.lock:
      key = (command, extra)
      if key not in self.jobs:
        trainer = None
        if command.module in ('train.sample', 'train.export'):
          trainer = trainer_of(command.workdir)
          self.start(trainer)
        self.jobs[key] = self.pool.submit(self._run, command, extra, trainer)
      return self.jobs[key]

  def run(self, command: Command, extra: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """What ``command`` printed: one result per process."""
    return self.start(command, extra).result()

  def _run(self, command: Command, extra: tuple[str, ...], trainer: Command | None):
    if trainer is not None:
      assert_ran(self.run(trainer), trainer)
    self.prepare(command)
    argv = [sys.executable, *command.argv[1:]] if command.argv[0] == 'python' else command.argv
    argv = [*argv, *(shrunk(command) if command.module == 'train' else ()), *extra]
    env = {**os.environ, **dict(command.env), 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)}
    # the suite's collective timeout (conftest.py), and quick compiles: each program runs a step or two
    xla_flags = [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']
    if 'XLA_FLAGS' in dict(command.env):
      xla_flags.append(dict(command.env)['XLA_FLAGS'])
    elif device_count(command) > 1:
      xla_flags.append(f'--xla_force_host_platform_device_count={device_count(command)}')
    env['XLA_FLAGS'] = ' '.join(xla_flags)
    coordinator = f'127.0.0.1:{_free_port()}'
    procs = [
      subprocess.Popen(
        [self.placed(word, process, coordinator) for word in argv],
        cwd=self.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for process in range(command.processes)
    ]
    return [_finish(p) for p in procs]


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
  try:
    out, err = process.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
  return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def trainer_of(workdir: str) -> Command:
  """The README command that trains into ``workdir``."""
  trainers = [c for c in COMMANDS if c.module == 'train' and c.workdir == workdir]
  assert trainers, f'no command in the README trains into {workdir}'
  return trainers[0]


def assert_ran(results: list[subprocess.CompletedProcess], command: Command):
  for i, result in enumerate(results):
    output = result.stdout + result.stderr
    where = f'{command.text}\n(process {i}: {shlex.join(result.args)})\n{output[-6000:]}'
    assert result.returncode == 0, where
    assert 'Traceback' not in output and 'Exception in thread' not in output, where


@pytest.fixture(scope='module')
def sandbox(request, tmp_path_factory):
  box = Sandbox(tmp_path_factory.mktemp('readme'))
  # every selected command starts now, so that each test only waits for its own
  for item in request.session.items:
    if item.module is not request.module:
      continue
    if item.originalname == 'test_sample_prints_text_and_json':
      box.start(SAMPLE, ('--format=json',))
    command = getattr(item, 'callspec', None) and item.callspec.params.get('command')
    if command and not not_run(command):
      box.start(command)
  yield box
  box.pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize(
  'command',
  [pytest.param(c, id=c.text, marks=marks(c)) for c in COMMANDS],
)
def test_command_runs(command, sandbox):
  assert_ran(sandbox.run(command), command)


def test_sample_prints_text_and_json(sandbox):
  """``train.sample`` shows each prompt in a header line and the text as text; ``--format=json`` one object."""
  (text,) = sandbox.run(SAMPLE)
  assert_ran([text], SAMPLE)
  prompt = SAMPLE.flags()['text']
  assert text.stdout.startswith(f'--- prompt: {json.dumps(prompt)}\n{prompt}'), text.stdout
  (machine,) = sandbox.run(SAMPLE, ('--format=json',))
  assert_ran([machine], SAMPLE)
  record = json.loads(machine.stdout)
  assert record['task'] == 'lm' and record['prompt'] == prompt
  assert record['output'].startswith(prompt)


def test_each_training_command_has_its_own_workdir():
  """A second command in a workdir would resume the first one's run (or be refused as another config), not train
  what it says."""
  workdirs = [c.workdir for c in COMMANDS if c.module == 'train' and not not_run(c)]
  assert len(workdirs) == len(set(workdirs)), workdirs


def test_the_commands_that_do_not_run_are_in_the_readme():
  """``NOT_RUN`` names only commands the README has, so it cannot outlive them."""
  for start in NOT_RUN:
    assert any(c.text.startswith(start) for c in COMMANDS), start
