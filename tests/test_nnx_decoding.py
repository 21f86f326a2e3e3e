"""transformer_jax.nnx beyond the forward pass: the key/value cache of an NNX model equals Linen's cached decoding bit
for bit (GPT, the encoder-decoder), generate and beam search equal the Linen path and trace their loop once,
load_hf equals transformers, and the NNX training loop gives the Linen optax loop's losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_nnx import LLAMA as NNX_LLAMA
from test_nnx import T5, TINY, V

import transformer_jax.nnx as tnnx
from transformer_jax import GPTConfig, decoding, generation
from transformer_jax import search as search_module
from transformer_jax.nnx import train_step

B, T, N = 2, 5, 3  # batch, prompt (or source) length, new tokens
GPT2 = GPTConfig.gpt2(vocab_size=V, **TINY)
# test_nnx's Llama shape (rotary, RMSNorm, SwiGLU, 6 query heads over 2 key/value heads, a sliding window of 3,
# scanned layers) without remat, which decoding does not use
LLAMA = NNX_LLAMA.replace(remat_policy='none')
PROMPT = np.array(jax.random.randint(jax.random.key(3), (B, T), 1, V), np.int32)
VALID = np.arange(T)[None] >= np.array([[0], [2]])  # (B, T): row 1 left-padded by 2
POSITIONS = np.maximum(np.cumsum(VALID, axis=1) - 1, 0)


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def linen_cache(linen, params, *args, **kwargs):
  """The zeroed cache generation.py builds for a Linen model (shapes from the dummy input in ``args``)."""
  method = type(linen).decode_step
  return decoding._empty_cache(linen, params, method, *args, **kwargs)


def test_gpt_cache_equals_linen_cached_decoding():
  model = tnnx.GPT(LLAMA, rngs=nnx.Rngs(0))
  linen, params = tnnx.to_linen(model)
  cache_valid = np.concatenate([VALID, np.ones((B, N), bool)], axis=1)  # (B, T + N)
  model.init_cache(B, T + N)
  dummy = jnp.zeros((B, T + N), jnp.int32)
  cache = linen_cache(linen, params, dummy, positions=dummy, cache_valid=cache_valid)
  assert_trees_equal(nnx.to_pure_dict(nnx.state(model, nnx.Cache)), cache)

  step = nnx.jit(lambda m, ids, p: m.decode_step(ids, positions=p, cache_valid=cache_valid))

  @jax.jit  # params are an argument, as the NNX step's are: XLA may fold captured constants differently
  def linen_step(params, cache, ids, positions):
    variables = {'params': params, 'cache': cache}
    kwargs = dict(positions=positions, cache_valid=cache_valid, method='decode_step')
    logits, updates = linen.apply(variables, ids, **kwargs, mutable=['cache'])
    return logits, updates['cache']

  ids, positions, fed = PROMPT, POSITIONS, [PROMPT]
  for _ in range(N):
    logits = step(model, ids, positions)
    expected, cache = linen_step(params, cache, ids, positions)
    assert_trees_equal(logits, expected)
    assert_trees_equal(nnx.to_pure_dict(nnx.state(model, nnx.Cache)), cache)
    ids, positions = np.argmax(logits[:, -1:], -1), positions[:, -1:] + 1
    fed.append(ids)
  # and the cached pass is the full one (up to float32 round-off)
  full = linen.apply({'params': params}, np.concatenate(fed[:-1], 1), valid=cache_valid[:, :-1])
  np.testing.assert_allclose(logits[:, -1], full[:, -1], atol=1e-5, rtol=0)
  nnx.pop(model, nnx.Cache)
  assert not nnx.state(model, nnx.Cache)


def test_encoder_decoder_cache_equals_linen_cached_decoding():
  model = tnnx.Transformer(T5, rngs=nnx.Rngs(0))
  linen, params = tnnx.to_linen(model)
  memory = model.encode(PROMPT, src_valid=VALID)  # (B, T, D)
  model.init_cache(memory, N + 1)
  dummy = jnp.zeros((B, N + 1), jnp.int32)
  cache = linen_cache(linen, params, dummy, memory, positions=dummy, memory_valid=VALID)
  step = nnx.jit(lambda m, ids, mem, p: m.decode_step(ids, mem, positions=p, memory_valid=VALID))

  @jax.jit
  def linen_step(cache, ids, memory, positions):
    variables = {'params': params, 'cache': cache}
    kwargs = dict(positions=positions, memory_valid=VALID, method='decode_step')
    logits, updates = linen.apply(variables, ids, memory, **kwargs, mutable=['cache'])
    return logits, updates['cache']

  ids = np.zeros((B, 1), np.int32)  # T5 starts from its padding token
  for j in range(N + 1):
    positions = np.full((B, 1), j)
    logits = step(model, ids, memory if j == 0 else None, positions)
    expected, cache = linen_step(cache, ids, memory if j == 0 else None, positions)
    assert_trees_equal(logits, expected)
    assert_trees_equal(nnx.to_pure_dict(nnx.state(model, nnx.Cache)), cache)
    ids = np.argmax(logits[:, -1:], -1)


@pytest.mark.parametrize('search', ['greedy', 'beam'])
def test_generation_equals_linen_path_and_traces_once(search, monkeypatch):
  model = tnnx.GPT(GPT2, rngs=nnx.Rngs(0))
  counted = search_module.choose if search == 'greedy' else search_module._top
  traces = []
  monkeypatch.setattr(
    search_module, counted.__name__, lambda *a, **kw: traces.append(1) or counted(*a, **kw)
  )
  optimizer = nnx.Optimizer(model, train_step.adamw_warmup_cosine(1e-2, 1, 2), wrt=nnx.Param)
  options = dict(max_new_tokens=N, prompt_valid=VALID)
  for _ in range(2):
    linen, params = tnnx.to_linen(model)
    if search == 'greedy':
      tokens = tnnx.generate(model, PROMPT, temperature=None, **options)
      expected = generation.generate(linen, params, PROMPT, temperature=None, **options)
    else:
      tokens = tnnx.beam_search(model, PROMPT, beam_size=2, eos_id=1, **options)
      expected = generation.beam_search(linen, params, PROMPT, beam_size=2, eos_id=1, **options)
    assert_trees_equal(tokens, expected)
    # a training step changes the params in place: the same compiled program decodes the new ones
    train_step.train_step(model, optimizer, {'ids': PROMPT})
  assert len(traces) == 2, 'one trace of the prefill choice and one of the loop body'


def test_translate_equals_linen_path():
  model = tnnx.Transformer(T5, rngs=nnx.Rngs(0))
  options = dict(max_len=N, bos_id=0, eos_id=1, src_valid=VALID)
  expected = generation.translate(*tnnx.to_linen(model), PROMPT, beam_size=2, **options)
  assert_trees_equal(tnnx.translate(model, PROMPT, beam_size=2, **options), expected)


def test_load_hf_equals_transformers(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = transformers.GPT2Config(
    n_layer=2,
    n_head=3,
    n_embd=24,
    vocab_size=V,
    n_positions=16,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_implementation='eager',
  )
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path)
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
  model = tnnx.load_hf(tmp_path)
  assert isinstance(model, tnnx.GPT)
  with torch.no_grad():
    expected = hf_model(torch.tensor(PROMPT)).logits.numpy()
  with jax.default_matmul_precision('highest'):
    logits = model(PROMPT)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


def test_train_step_gives_the_linen_optax_loop_losses():
  model = tnnx.GPT(GPT2, rngs=nnx.Rngs(params=0, dropout=1))
  linen, params = tnnx.to_linen(model)
  schedule = dict(peak_lr=1e-2, warmup_steps=5, total_steps=20)
  optimizer = train_step.make_optimizer(model, **schedule)
  tx = train_step.adamw_warmup_cosine(**schedule)
  ids = np.tile(np.arange(1, T + 2), (B, 1))  # (B, T + 1): a pattern to learn
  weights = np.ones((B, T), np.float32)
  weights[1, -1] = 0.0  # a target that does not count
  batch = {'ids': ids, 'weights': weights}
  # the model's dropout keys: fold_in(the forked stream's key, step)
  dropout_key = nnx.Rngs(dropout=1).fork().dropout.key[...]

  @jax.jit  # the batch is an argument, as the NNX step's is: XLA may fold captured constants differently
  def linen_step(params, opt_state, step, batch):
    rngs = {'dropout': jax.random.fold_in(dropout_key, step)}

    def loss_fn(params):
      forward = lambda x, deterministic: linen.apply(  # noqa: E731
        {'params': params}, x, deterministic=deterministic, rngs=rngs
      )
      return train_step.causal_lm_loss(forward, **batch)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses, linen_losses = tx.init(params), [], []
  for step in range(20):
    losses.append(float(train_step.train_step(model, optimizer, batch)))
    params, opt_state, loss = linen_step(params, opt_state, jnp.uint32(step), batch)
    linen_losses.append(float(loss))
  assert losses == linen_losses
  assert losses[-1] < 0.5 * losses[0]
  assert_trees_equal(tnnx.to_linen(model)[1], params)
