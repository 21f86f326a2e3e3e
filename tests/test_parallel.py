"""The trainer under device layouts: data parallel, FSDP, tensor parallel, a 2-D mix and pmap on 8 simulated devices,
two processes on localhost, and restores under another layout, all equal to one device.

The runs happen once per module in subprocesses (``workers/train_layouts.py``; the device count is fixed when JAX
starts); the tests below read what they left behind.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from filelock import FileLock
from train_helpers import command_line, layout_fields

REPO = pathlib.Path(__file__).parents[1]
WORKER = REPO / 'tests' / 'workers' / 'train_layouts.py'
STEPS = 3
# layout name -> mesh DATAxFSDPxTENSOR (every mesh uses all 8 devices) or 'pmap'
LAYOUTS = {
  'data': '8x1x1',
  'fsdp': '1x8x1',
  'tensor': '2x1x4',
  'fsdp_tensor': '1x4x2',
  'pmap': 'pmap',
}
TASKS = {'gpt': 'lm', 'encoder_decoder': 'translation'}
# The GPT runs every layout. The encoder-decoder, whose runs take twice as long (its evaluation decodes), runs the two
# that differ most: parameters split both ways, and pmap's replicas.
MODEL_LAYOUTS = [('gpt', name) for name in LAYOUTS] + [
  ('encoder_decoder', name) for name in ('fsdp_tensor', 'pmap')
]
NNX_LAYOUT = 'fsdp_tensor'  # the layout the NNX trainer runs too: parameters and optimizer state split both ways
pytestmark = pytest.mark.slow


def _run(command, env, timeout=600):
  result = subprocess.run(
    command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Runs every layout once per test session and returns the output folder (see the worker's docstring for what it
  holds). Under pytest -n the first worker to get here runs them and the others wait for it and reuse the results:
  two workers training 8 simulated devices each at once would take twice as long on shared cores."""
  worker_root = tmp_path_factory.getbasetemp()
  # this session's folder: under pytest -n each worker's base folder sits inside it
  shared = worker_root.parent if os.environ.get('PYTEST_XDIST_WORKER') else worker_root
  out = shared / 'layouts'
  with FileLock(str(shared / 'layouts.lock')):
    if not (out / 'complete').exists():
      shutil.rmtree(out, ignore_errors=True)
      out.mkdir()
      _run_layouts(out)
      (out / 'complete').touch()
  return out


def _run_layouts(out):
  # compiled programs stay out of the user's cache
  env = {
    **os.environ,
    'XDG_CACHE_HOME': str(out / 'cache'),
  }
  eight = [
    f'{model}_{name}:{TASKS[model]}:{LAYOUTS[name]}:{STEPS}' for model, name in MODEL_LAYOUTS
  ]
  # Saved under FSDP on 8 devices after 2 steps, then continued under tensor parallelism (8 devices) and on 1 device;
  # also continued by the NNX trainer, whose own FSDP checkpoint the Linen trainer continues.
  eight += ['saved_fsdp:lm:1x8x1:2', 'resumed_tensor:lm:2x1x4:3:saved_fsdp']
  eight += [
    f'{model}_nnx:{task}:nnx-{LAYOUTS[NNX_LAYOUT]}:{STEPS}' for model, task in TASKS.items()
  ]
  eight += ['resumed_nnx:lm:nnx-2x1x4:3:saved_fsdp', 'saved_nnx:lm:nnx-1x8x1:2']
  eight += ['resumed_from_nnx:lm:2x1x4:3:saved_nnx']
  _run([sys.executable, str(WORKER), '8', str(out), *eight], env)

  # Two processes with 4 devices each, through the real command line: a 2 x 2 x 2 mesh spanning both.
  fields = {**layout_fields('lm', '2x2x2'), 'num_train_steps': STEPS}
  flags = command_line('lm', fields) + [
    f'--workdir={out / "two_processes"}',
    f'--config.distributed.coordinator_address=127.0.0.1:{_free_port()}',
    '--config.distributed.num_processes=2',
  ]
  env4 = {
    **env,
    'XLA_FLAGS': env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4',
  }
  procs = [
    subprocess.Popen(
      [sys.executable, '-m', 'train', *flags, f'--config.distributed.process_id={i}'],
      cwd=REPO,
      env=env4,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, output) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i}:\n{output[-6000:]}'
  (out / 'two_processes.log').write_text(outputs[0])

  # One device: the references, and restores of the 8-device and two-process checkpoints (the latter is complete,
  # so restoring it runs no step: its parameters are those the two processes saved).
  one = [f'{model}_single:{task}:single:{STEPS}' for model, task in TASKS.items()]
  one += [
    'resumed_single:lm:single:3:saved_fsdp',
    'two_processes_restored:lm:single:3:two_processes',
  ]
  _run([sys.executable, str(WORKER), '1', str(out), *one], env)


def train_losses(workdir) -> list[float]:
  with open(workdir / 'metrics.jsonl') as f:
    return [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']


def max_param_diff(out, name: str, reference: str) -> float:
  a, b = np.load(out / f'{name}.npz'), np.load(out / f'{reference}.npz')
  assert set(a) == set(b)
  return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def record(out, name: str) -> dict:
  """``{'specs': {parameter: PartitionSpec}, 'log': [trainer messages]}`` of one run."""
  return json.loads((out / f'{name}.json').read_text())


def specs(out, name: str) -> dict:
  return record(out, name)['specs']


def assert_resumed(out, name: str, step: int):
  """The run restored its checkpoint (a failed restore would start afresh and could still match one device)."""
  log = record(out, name)['log']
  assert any(m.startswith(f'resuming from step {step} ') for m in log), log
  assert not any('could not be restored' in m for m in log), log


@pytest.mark.parametrize('model, layout', MODEL_LAYOUTS, ids=[f'{m}-{n}' for m, n in MODEL_LAYOUTS])
def test_layout_trains_like_one_device(runs, model, layout):
  name, reference = f'{model}_{layout}', f'{model}_single'
  np.testing.assert_allclose(
    train_losses(runs / name), train_losses(runs / reference), rtol=1e-5, atol=1e-6
  )
  assert len(train_losses(runs / name)) == STEPS
  assert max_param_diff(runs, name, reference) < 1e-5


@pytest.mark.parametrize('model', TASKS)
def test_parameters_are_sharded_as_configured(runs, model):
  decoder = (
    f'decoder/layers_0/{"self_attention/qkv" if model == "gpt" else "self_attention/query"}/kernel'
  )
  fc_in, fc_out = 'decoder/layers_0/ffn/fc_in/kernel', 'decoder/layers_0/ffn/fc_out/kernel'
  ran = {name for m, name in MODEL_LAYOUTS if m == model}
  if 'data' in ran:
    data = specs(runs, f'{model}_data')
    assert all("'fsdp'" not in s and "'tensor'" not in s for s in data.values())
  if 'fsdp' in ran:
    fsdp = specs(runs, f'{model}_fsdp')
    assert fsdp[decoder].startswith("P('fsdp'") and fsdp[fc_out] == "P(None, 'fsdp')"
  if 'tensor' in ran:
    tensor = specs(runs, f'{model}_tensor')
    assert "'tensor'" in tensor[decoder]
    assert tensor[fc_in] == "P(None, 'tensor')" and tensor[fc_out] == "P('tensor', None)"
  mixed = specs(runs, f'{model}_fsdp_tensor')
  assert "'fsdp'" in mixed[decoder] and "'tensor'" in mixed[decoder]
  assert mixed[fc_in] == "P('fsdp', 'tensor')" and mixed[fc_out] == "P('tensor', 'fsdp')"
  assert all(s == 'P()' for s in specs(runs, f'{model}_pmap').values())  # one replica per device


def test_two_processes_train_like_one_process(runs):
  np.testing.assert_allclose(
    train_losses(runs / 'two_processes'), train_losses(runs / 'gpt_single'), rtol=1e-5
  )
  # its parameters are the ones the two processes saved
  assert_resumed(runs, 'two_processes_restored', STEPS)
  assert max_param_diff(runs, 'two_processes_restored', 'gpt_single') < 1e-5
  log = (runs / 'two_processes.log').read_text()
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} (8 devices, 2 processes)" in log


@pytest.mark.parametrize('name', ['resumed_tensor', 'resumed_single'])
def test_checkpoint_restores_under_another_layout(runs, name):
  """Saved under FSDP on 8 devices at step 2, continued to step 3 under another layout: the uninterrupted numbers."""
  assert_resumed(runs, name, 2)
  assert max_param_diff(runs, name, 'gpt_single') < 1e-5
  np.testing.assert_allclose(
    train_losses(runs / name), train_losses(runs / 'gpt_single'), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('model', TASKS)
def test_nnx_trainer_equals_linen_trainer_on_8_devices(runs, model):
  """``api='nnx'`` on the FSDP x tensor mesh: the Linen run's losses and parameters, laid out alike."""
  name, linen = f'{model}_nnx', f'{model}_{NNX_LAYOUT}'
  assert train_losses(runs / name) == train_losses(runs / linen)
  assert max_param_diff(runs, name, linen) == 0.0
  # the same layouts: the NNX step's outputs keep the sharding XLA propagates, whose specs drop trailing Nones

  def trimmed(specs: dict) -> dict:
    names = {k: re.findall(r"None|'[^']*'", v) for k, v in specs.items()}
    for entries in names.values():
      while entries and entries[-1] == 'None':
        entries.pop()
    return names

  assert trimmed(specs(runs, name)) == trimmed(specs(runs, linen))
  assert any(m.startswith('layout: nnx jit over mesh') for m in record(runs, name)['log'])


@pytest.mark.parametrize('name', ['resumed_nnx', 'resumed_from_nnx'])
def test_checkpoint_resumes_under_the_other_api(runs, name):
  """A Linen FSDP checkpoint continued by the NNX trainer, and an NNX one by the Linen trainer, under tensor
  parallelism: the uninterrupted numbers."""
  assert_resumed(runs, name, 2)
  assert max_param_diff(runs, name, 'gpt_single') < 1e-5
  np.testing.assert_allclose(
    train_losses(runs / name), train_losses(runs / 'gpt_single'), rtol=1e-5, atol=1e-6
  )
