"""Every notebook runs top to bottom on CPU; assertions inside the notebooks check the key numbers."""

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / 'notebooks').glob('*.ipynb'))


def test_there_are_notebooks():
  assert NOTEBOOKS, 'no notebooks found'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code), (
    'outputs must be stripped before commit'
  )
  assert nb.cells[0].cell_type == 'markdown' and 'colab.research.google.com' in nb.cells[0].source
  assert 'find_spec' in code[0].source, 'the first code cell must install the project on Colab only'


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel compiles with full optimisation (tests/conftest.py lowers it for the suite's short programs): two
  # notebooks train for hundreds of steps, in about half the time.
  monkeypatch.setenv(
    'XLA_FLAGS', re.sub(r'--xla_backend_optimization_level=\S+', '', os.environ['XLA_FLAGS'])
  )
  if path.stem == '05_scale_out' and os.environ.get('CI'):
    # Its simulated devices' collectives have hung inside the full suite on 2 cores (alone it passes); the same
    # layouts are trained by tests/test_parallel.py in a subprocess.
    pytest.skip('notebook 05 runs outside CI: its XLA:CPU collectives can hang beside the suite')
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  ).execute()
