"""``kernels.packaged_library``: the vendor libraries of PyPI packages (MKL, oneDNN) that kernels load, and the
switches that choose them. A missing package is one logged line and XLA's products; a switch reads as auto, on or
off."""

import importlib.metadata
import logging

import pytest

from transformer_jax.kernels import mkl_matmul, onednn_matmul, packaged_library


@pytest.mark.parametrize(
  'module, loader',
  [(mkl_matmul, mkl_matmul.load_mkl), (onednn_matmul, onednn_matmul.load_onednn)],
  ids=['mkl', 'onednn'],
)
def test_missing_package_is_one_logged_line(monkeypatch, caplog, module, loader):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'distribution', missing)
  with caplog.at_level(logging.INFO, logger=module.__name__):
    assert loader.__wrapped__() is None
  assert len(caplog.records) == 1 and 'using XLA' in caplog.text


class NoSuchFile:
  files = [importlib.metadata.PackagePath('lib/libother.so')]


def test_package_without_the_library_is_one_warning(monkeypatch, caplog):
  monkeypatch.setattr(importlib.metadata, 'distribution', lambda name: NoSuchFile())
  log = logging.getLogger('packaged_library_test')
  with caplog.at_level(logging.INFO, logger=log.name):
    assert packaged_library.load('some-package', 'libdnnl.so', 'a product', log) is None
  assert len(caplog.records) == 1 and caplog.records[0].levelname == 'WARNING'
  assert 'has no libdnnl.so' in caplog.text


@pytest.mark.parametrize(
  'value, mode',
  [(None, 'auto'), ('auto', 'auto'), ('1', 'on'), ('TRUE', 'on'), ('on', 'on'), ('0', 'off'), ('False', 'off'),
   ('OFF', 'off'), ('maybe', 'auto')],
  ids=['unset', 'auto', 'one', 'true', 'on', 'zero', 'false', 'off', 'other'],
)  # fmt: skip
def test_switch_reads_auto_on_or_off(monkeypatch, value, mode):
  if value is None:
    monkeypatch.delenv('TRANSFORMER_JAX_SOME_LIBRARY', raising=False)
  else:
    monkeypatch.setenv('TRANSFORMER_JAX_SOME_LIBRARY', value)
  assert packaged_library.mode('TRANSFORMER_JAX_SOME_LIBRARY') == mode
