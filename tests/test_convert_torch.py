"""Parity with PyTorch for the reference models (the course's encoder-decoder and nanoGPT) and torch.nn.Transformer:
forward, gradients, 20 AdamW steps, and ours -> torch -> ours round trips.

Tiny models with distinct odd sizes: batch 2, target length 5, source length 7, 3 heads of size 4, vocabularies 37/41.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

from transformer_jax import GPT, GPTConfig, Transformer, TransformerConfig, convert, torch_reference  # noqa: E402
from transformer_jax.convert import ConversionError  # noqa: E402
from transformer_jax.convert.engine import flatten  # noqa: E402

B, T, S, H, K, F, SRC_V, TGT_V, MAX_LEN = 2, 5, 7, 3, 4, 20, 37, 41, 16
D = H * K
SMALL_SEQ2SEQ = dict(
  src_vocab_size=SRC_V,
  tgt_vocab_size=TGT_V,
  d_model=D,
  num_heads=H,
  d_ff=F,
  num_layers=1,
  max_len=MAX_LEN,
)
SMALL_GPT = dict(vocab_size=SRC_V, max_len=MAX_LEN, d_model=D, num_heads=H, d_ff=F, num_layers=1)


def make_nanogpt(layers=2):
  return torch_reference.NanoGPT(
    vocab_size=SRC_V, block_size=MAX_LEN, n_embd=D, n_head=H, n_layer=layers, dropout=0.0
  )


def make_seq2seq(layers=2):
  return torch_reference.Seq2SeqTransformer(
    SRC_V,
    TGT_V,
    d_model=D,
    num_layers=layers,
    num_heads=H,
    d_ff=F,
    max_seq_length=MAX_LEN,
    dropout=0.0,
  )


def make_torch_transformer(norm_first=False, batch_first=False, activation='relu'):
  """``nn.ModuleDict`` of an ``nn.Transformer`` with the embeddings and output layer a user builds around it."""
  return torch.nn.ModuleDict(
    dict(
      transformer=torch.nn.Transformer(
        D,
        H,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=F,
        dropout=0.0,
        activation=activation,
        norm_first=norm_first,
        batch_first=batch_first,
      ),
      source_embed=torch.nn.Embedding(SRC_V, D),
      target_embed=torch.nn.Embedding(TGT_V, D),
      output=torch.nn.Linear(D, TGT_V),
    )
  )


def from_bundle(bundle, **options):
  return convert.from_torch_transformer(
    bundle['transformer'],
    bundle['source_embed'],
    bundle['target_embed'],
    bundle['output'],
    max_len=MAX_LEN,
    **options,
  )


def padded_ids(rng, vocab, length, lengths):
  """``(B, length)`` ids in ``[1, vocab)`` with id 0 (padding) after each row's length."""
  ids = rng.integers(1, vocab, (len(lengths), length))
  ids[np.arange(length)[None] >= np.asarray(lengths)[:, None]] = 0
  return ids


def seq2seq_batch(rng):
  return padded_ids(rng, SRC_V, S, [S, 4]), padded_ids(rng, TGT_V, T, [3, T])


def torch_seq2seq_logits(bundle, src, tgt):
  """The torch pipeline ``from_torch_transformer`` assumes: scaled embeddings + interleaved sinusoids, the
  ``nn.Transformer`` with key padding masks and a causal target mask, the output layer."""
  transformer = bundle['transformer']
  src, tgt = torch.as_tensor(src), torch.as_tensor(tgt)
  pe = torch_reference.PositionalEncoding(D, MAX_LEN).pe[0]  # (max_len, D)
  x = bundle['source_embed'](src) * math.sqrt(D) + pe[:S]
  y = bundle['target_embed'](tgt) * math.sqrt(D) + pe[:T]
  if not transformer.batch_first:
    x, y = x.transpose(0, 1), y.transpose(0, 1)  # (S, B, D), (T, B, D)
  causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # torch: True = may NOT attend
  out = transformer(
    x,
    y,
    tgt_mask=causal,
    src_key_padding_mask=src == 0,
    tgt_key_padding_mask=tgt == 0,
    memory_key_padding_mask=src == 0,
  )
  return bundle['output'](out if transformer.batch_first else out.transpose(0, 1))


def ours(model, params, *inputs, **kwargs):
  """Our forward pass, jitted (op-by-op dispatch compiles every primitive and is far slower)."""
  return np.asarray(
    jax.jit(model.apply)({'params': params}, *(jnp.asarray(x) for x in inputs), **kwargs)
  )


# --------------------------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize('norm_first', [False, True], ids=['post_norm', 'pre_norm'])
@pytest.mark.parametrize('batch_first', [False, True], ids=['seq_first', 'batch_first'])
@pytest.mark.parametrize('activation', ['relu', 'gelu'])
def test_torch_transformer_forward(rng, norm_first, batch_first, activation):
  torch.manual_seed(0)
  bundle = make_torch_transformer(norm_first, batch_first, activation)
  model, params = from_bundle(bundle)
  src, tgt = seq2seq_batch(rng)
  # grad mode on: no nested-tensor fast path
  expected = torch_seq2seq_logits(bundle, src, tgt).detach().numpy()
  np.testing.assert_allclose(ours(model, params, src, tgt), expected, atol=1e-5, rtol=0)


def test_seq2seq_reference_forward(rng):
  torch.manual_seed(0)
  ref = make_seq2seq()
  model, params = convert.from_reference_transformer(ref)
  src, tgt = seq2seq_batch(rng)
  expected = ref(torch.as_tensor(src), torch.as_tensor(tgt)).detach().numpy()
  np.testing.assert_allclose(ours(model, params, src, tgt), expected, atol=1e-5, rtol=0)


def test_nanogpt_reference_forward(rng):
  torch.manual_seed(0)
  ref = make_nanogpt()
  model, params = convert.from_reference_gpt(ref)
  ids, valid = rng.integers(0, SRC_V, (B, T)), np.arange(T)[None] < np.array([[T], [3]])
  expected = ref(torch.as_tensor(ids), torch.as_tensor(valid)).detach().numpy()
  np.testing.assert_allclose(
    ours(model, params, ids, valid=jnp.asarray(valid)), expected, atol=1e-5, rtol=0
  )


# ------------------------------------------------------------------------------------ gradients and training


def gpt_task(rng, layers):
  """(torch module, ours, params, to_torch, batch fn, torch logits fn, jax logits fn) for the nanoGPT reference."""
  ref = make_nanogpt(layers)
  model, params = convert.from_reference_gpt(ref)

  def batch():
    ids = rng.integers(0, SRC_V, (B, T + 1))
    return ids[:, :-1], ids[:, 1:]

  def torch_logits(inputs):
    return ref(torch.as_tensor(inputs))

  def jax_logits(p, inputs):
    return model.apply({'params': p}, inputs)

  return ref, model, params, convert.to_reference_gpt, batch, torch_logits, jax_logits


def seq2seq_task(rng, layers):
  ref = make_seq2seq(layers)
  model, params = convert.from_reference_transformer(ref)

  def batch():
    src, tgt = seq2seq_batch(rng)
    # BOS = 1, shifted right
    tgt_in = np.concatenate([np.ones((B, 1), tgt.dtype), tgt[:, :-1]], axis=1)
    return (src, tgt_in), tgt

  def torch_logits(inputs):
    return ref(*(torch.as_tensor(x) for x in inputs))

  def jax_logits(p, inputs):
    return model.apply({'params': p}, *inputs)

  return ref, model, params, convert.to_reference_transformer, batch, torch_logits, jax_logits


TASKS = [pytest.param(gpt_task, id='nanogpt'), pytest.param(seq2seq_task, id='seq2seq')]


def torch_loss(logits, labels):
  """Mean cross-entropy over non-padding labels (id 0 is padding)."""
  labels = torch.as_tensor(labels)
  per_token = torch.nn.functional.cross_entropy(
    logits.flatten(0, 1), labels.flatten(), reduction='none'
  )
  weights = (labels.flatten() != 0).float()
  return (per_token * weights).sum() / weights.sum()


def jax_loss(logits, labels):
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = (labels != 0).astype(jnp.float32)
  return (per_token * weights).sum() / weights.sum()


@pytest.mark.parametrize('task', TASKS)
def test_gradient_parity(rng, task):
  torch.manual_seed(0)
  ref, model, params, to_torch, batch, torch_logits, jax_logits = task(rng, layers=2)
  inputs, labels = batch()
  torch_loss(torch_logits(inputs), labels).backward()
  grads = jax.jit(jax.grad(lambda p: jax_loss(jax_logits(p, inputs), labels)))(params)
  ours_as_torch = to_torch(model, grads)  # our gradient tree, in the reference's names and layouts
  torch_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
  assert set(ours_as_torch) == set(torch_grads)
  worst = max(np.abs(ours_as_torch[n] - torch_grads[n]).max() for n in torch_grads)
  assert worst < 1e-4, worst
  # the gradients are not trivially zero
  assert max(np.abs(g).max() for g in torch_grads.values()) > 1e-3


@pytest.mark.parametrize('task', TASKS)
def test_adamw_training_parity(rng, task):
  """20 AdamW steps from the same converted weights on the same batches: the losses agree at every step."""
  torch.manual_seed(0)
  # 1 layer: compile time
  ref, model, params, _, batch, torch_logits, jax_logits = task(rng, layers=1)
  lr, wd, eps = 3e-3, 0.01, 1e-8
  torch_opt = torch.optim.AdamW(
    ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd
  )
  # optax's default weight_decay is 1e-4, not 1e-2
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=eps, weight_decay=wd)

  @jax.jit
  def step(p, opt_state, inputs, labels):
    loss, grads = jax.value_and_grad(lambda q: jax_loss(jax_logits(q, inputs), labels))(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = tx.init(params)
  torch_losses, jax_losses = [], []
  for _ in range(20):
    inputs, labels = batch()
    torch_opt.zero_grad()
    loss = torch_loss(torch_logits(inputs), labels)
    loss.backward()
    torch_opt.step()
    torch_losses.append(loss.item())
    params, opt_state, jloss = step(params, opt_state, inputs, labels)
    jax_losses.append(float(jloss))
  np.testing.assert_allclose(jax_losses, torch_losses, atol=1e-4, rtol=0)
  assert torch_losses[-1] < torch_losses[0]  # it trained, so the steps were not no-ops


# ----------------------------------------------------------------------------------------------- round trips

SOURCES = {
  'nanogpt': (make_nanogpt, convert.from_reference_gpt, convert.to_reference_gpt),
  'seq2seq': (make_seq2seq, convert.from_reference_transformer, convert.to_reference_transformer),
  'nn_transformer': (make_torch_transformer, from_bundle, convert.to_torch_transformer),
}


@pytest.mark.parametrize('source', sorted(SOURCES))
def test_ours_to_torch_to_ours_is_identity(rng, source):
  make, from_torch, to_torch = SOURCES[source]
  model, params = from_torch(make())
  # unlike any torch init
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype), params)
  module = make()
  module.load_state_dict(to_torch(model, params, as_torch=True), strict=True)
  _, back = from_torch(module)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  back = flatten(back)
  for path, value in flatten(params).items():
    np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(value), err_msg=path)


def test_scan_layout_exports_like_the_loop_layout():
  """Params of a ``scan_layers`` model (stacked layers) export to the same state dict as the loop layout."""
  model, params = convert.from_reference_gpt(make_nanogpt(layers=3))
  scan_model = model.clone(config=model.config.replace(scan_layers=True))
  stacked = convert.engine.to_model_layout(params, scan_model.config)
  # The layout the scanned model itself creates, not the converter's idea of it.
  real = jax.eval_shape(scan_model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, real)
  loop_state, scan_state = (
    convert.to_reference_gpt(model, params),
    convert.to_reference_gpt(scan_model, stacked),
  )
  assert set(loop_state) == set(scan_state)
  for name in loop_state:
    np.testing.assert_array_equal(scan_state[name], loop_state[name], err_msg=name)


@pytest.mark.parametrize(
  'export, model, message',
  [
    (
      convert.to_reference_transformer,
      lambda: Transformer(TransformerConfig.course(norm_variant='standard', **SMALL_SEQ2SEQ)),
      r"the course's encoder-decoder cannot express this model: norm_variant='standard' \(needs 'unbiased_std'\)",
    ),
    (
      convert.to_reference_gpt,
      lambda: GPT(GPTConfig.course(activation='gelu', **SMALL_GPT)),
      r"the course's nanoGPT cannot express this model: activation='gelu' \(needs 'relu'\)",
    ),
    (
      convert.to_torch_transformer,
      lambda: Transformer(TransformerConfig(activation='gelu_tanh', **SMALL_SEQ2SEQ)),
      r"nn.Transformer cannot express this model: .*activation='gelu_tanh'",
    ),
  ],
  ids=['seq2seq_standard_norm', 'nanogpt_gelu', 'nn_transformer_tanh_gelu'],
)
def test_export_refuses_a_model_the_format_cannot_express(export, model, message):
  """Weights that would load into the target and compute something else are refused, never written."""
  model = model()
  ids = jnp.ones((1, 3), jnp.int32)
  params = jax.eval_shape(
    model.init, jax.random.key(0), *((ids, ids) if isinstance(model, Transformer) else (ids,))
  )
  with pytest.raises(ConversionError, match=message):
    export(model, params['params'])
