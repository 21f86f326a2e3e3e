"""Sharded safetensors checkpoints load one tensor at a time: logits against transformers, the errors of a missing or
damaged shard, and the reader itself (one file open at a time, no tensor kept once converted, every name and shape
checked before any data is read). A tiny random Llama of odd shape (3 layers, d_model 96, 6 query heads of 16 over 2
key/value heads, FFN 160, vocabulary 211) saved in 50 KB shards."""

import gc
import json
import weakref

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from transformer_jax.convert import ConversionError, from_llama, hf_directory, load_hf  # noqa: E402

SHAPE = dict(
  num_hidden_layers=3,
  hidden_size=96,
  num_attention_heads=6,
  num_key_value_heads=2,
  intermediate_size=160,
  vocab_size=211,
  max_position_embeddings=32,
  rms_norm_eps=1e-5,
  rope_theta=10000.0,
  tie_word_embeddings=False,
)
B, T = 2, 7


def _hf_model(dtype=torch.float32, **overrides):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, **overrides})).eval()
  with torch.no_grad():
    for p in model.parameters():  # the norm weights too: none stays at its init of ones
      p.add_(0.1 * torch.randn_like(p))
  return model.to(dtype)


def _save_sharded(model, path):
  model.save_pretrained(path, max_shard_size='50KB')
  return sorted(path.glob('model-*.safetensors'))


@pytest.fixture(scope='module')
def hf_model():
  return _hf_model()


@pytest.fixture
def sharded(tmp_path, hf_model):
  """``(directory, its shard files)``."""
  return tmp_path, _save_sharded(hf_model, tmp_path)


def test_sharded_checkpoint_logits_match_transformers(sharded, hf_model):
  path, shards = sharded
  index = json.loads((path / 'model.safetensors.index.json').read_text())
  assert len(shards) > 5 and sorted(set(index['weight_map'].values())) == [s.name for s in shards]
  assert not (path / 'model.safetensors').exists()

  model, params = load_hf(path)
  # the same params as the conversion of the module itself, bit for bit
  _, expected = from_llama(hf_model)
  jax.tree.map(np.testing.assert_array_equal, params, expected)

  ids = np.random.default_rng(0).integers(0, SHAPE['vocab_size'], (B, T))
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(model.apply({'params': params}, ids))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
  assert ours.shape == (B, T, SHAPE['vocab_size'])
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_missing_shard_is_named(sharded):
  path, shards = sharded
  shards[2].unlink()
  with pytest.raises(ConversionError, match='lists shards that are missing') as error:
    load_hf(path)
  assert shards[2].name in str(error.value)


def test_truncated_shard_is_named(sharded):
  path, shards = sharded
  shards[3].write_bytes(shards[3].read_bytes()[:-100])  # the header intact, the data cut short
  with pytest.raises(ConversionError, match='cannot read weights file') as error:
    load_hf(path)
  assert str(shards[3]) in str(error.value) and '\n' not in str(error.value)


def test_shard_removed_after_its_header_was_read_is_named(sharded, monkeypatch):
  """A lookup that fails halfway through the conversion reports the file and leaves none open."""
  path, shards = sharded
  reads = _watch_reads(monkeypatch)
  real_init = hf_directory.SafetensorsState.__init__

  def init_then_remove(self, files):
    real_init(self, files)
    shards[-1].unlink()  # a shard written by save_pretrained last holds the last layers' weights

  monkeypatch.setattr(hf_directory.SafetensorsState, '__init__', init_then_remove)
  with pytest.raises(ConversionError, match='cannot read weights file') as error:
    load_hf(path)
  assert str(shards[-1]) in str(error.value)
  assert reads.open_now == 0 and reads.tensors > 0


class _Reads:
  """What the reader did: files open now and at most, tensors read, and weak references to each tensor it returned."""

  def __init__(self):
    self.open_now = self.max_open = self.tensors = self.max_alive = 0
    self.returned: list[weakref.ref] = []

  def alive(self) -> int:
    return sum(r() is not None for r in self.returned)


def _watch_reads(monkeypatch) -> _Reads:
  """Wraps ``safetensors.safe_open`` as the loader sees it, and makes ``load_file`` (reading whole shards) fail."""
  reads = _Reads()
  real_open = safetensors.safe_open

  class Watched:
    def __init__(self, file, framework):
      self.file = real_open(file, framework)

    def __enter__(self):
      reads.open_now += 1
      reads.max_open = max(reads.max_open, reads.open_now)
      self.file.__enter__()
      return self

    def __exit__(self, *exc):
      reads.open_now -= 1
      return self.file.__exit__(*exc)

    def keys(self):
      return self.file.keys()

    def get_slice(self, key):
      return self.file.get_slice(key)

    def get_tensor(self, key):
      # numpy arrays hold no references: refcounting frees a dropped one at once, no collection needed
      reads.max_alive = max(reads.max_alive, reads.alive())
      tensor = self.file.get_tensor(key)
      reads.tensors += 1
      reads.returned.append(weakref.ref(tensor))
      return tensor

  def whole_file(*args, **kwargs):
    raise AssertionError('a shard was read whole')

  monkeypatch.setattr(safetensors, 'safe_open', Watched)
  monkeypatch.setattr(safetensors.numpy, 'load_file', whole_file)
  return reads


@pytest.mark.parametrize(
  'stored, requested',
  [('float32', 'bfloat16'), ('bfloat16', 'float32')],
  ids=['f32_to_bf16', 'bf16_to_f32'],
)
def test_loader_holds_one_tensor_at_a_time(tmp_path, monkeypatch, stored, requested):
  """Every tensor changes dtype, so none can become a param itself: once converted, each must be freed before the
  next one is read. Reading the shards whole, or every tensor before converting, fails here."""
  hf_model = _hf_model(getattr(torch, stored))
  assert len(_save_sharded(hf_model, tmp_path)) > 5
  expected_reads = len(
    json.loads((tmp_path / 'model.safetensors.index.json').read_text())['weight_map']
  )
  reads = _watch_reads(monkeypatch)

  model, params = load_hf(tmp_path, dtype=requested)

  assert {x.dtype.name for x in jax.tree.leaves(params)} == {requested}
  assert reads.tensors == expected_reads  # each tensor read once
  assert reads.max_alive == 0  # at each read, every tensor read before it was already freed
  gc.collect()
  assert reads.alive() == 0
  assert reads.max_open == 1 and reads.open_now == 0
  mapped = [line for line in _maps() if str(tmp_path) in line]
  assert not mapped, mapped
  monkeypatch.undo()
  _, expected = from_llama(hf_model, dtype=requested)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def _maps() -> list[str]:
  """The files this process has mapped (Linux), e.g. shards ``safe_open`` left mapped."""
  try:
    with open('/proc/self/maps') as f:
      return f.readlines()
  except OSError:
    return []


def test_names_and_shapes_are_checked_before_any_tensor_is_read(sharded, monkeypatch):
  path, shards = sharded
  index = json.loads((path / 'model.safetensors.index.json').read_text())
  name = 'model.layers.1.mlp.up_proj.weight'
  shard = path / index['weight_map'][name]
  tensors = safetensors.numpy.load_file(shard)
  tensors[name] = np.zeros((161, 96), np.float32)
  safetensors.numpy.save_file(tensors, shard, metadata={'format': 'pt'})
  reads = _watch_reads(monkeypatch)
  with pytest.raises(
    ConversionError, match=f'wrong shape: {name}: expected \\(160, 96\\), found \\(161, 96\\)'
  ):
    load_hf(path)
  assert reads.tensors == 0
