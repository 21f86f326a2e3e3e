"""Generation: cached decoding equals the full pass, greedy equals Hugging Face, beam search equals brute force,
sampling respects top-k/top-p, the loop compiles once, and impossible requests are refused."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from transformer_jax import GPT, GPTConfig, Transformer, TransformerConfig, decoding
from transformer_jax import search as search_module
from transformer_jax.convert import from_gpt2
from transformer_jax.generation import beam_search, generate, translate, translate_beams

B, T, S, H, K, F, L = 2, 5, 7, 3, 4, 19, 2
D = H * K
V, SRC_V, TGT_V = 37, 23, 29
N = 6  # new tokens
TINY = dict(
  num_layers=L,
  d_model=D,
  num_heads=H,
  d_ff=F,
  max_len=16,
  dropout_rate=0.0,
  attention_dropout_rate=0.0,
)
# row 1 has 2 padding tokens
LEFT_PADDED = np.array([[True] * T, [False, False] + [True] * (T - 2)])


def random_params(model, *dummy_inputs):
  """Normal(0, 0.3) parameters of the model's shapes: wide logits (no near-ties), and no init to compile."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), shapes)


@functools.lru_cache(maxsize=None)  # tests share models, so they also share compiled decoders
def tiny_gpt(**kw):
  model = GPT(GPTConfig(**{**TINY, 'vocab_size': V, **kw}))
  return model, random_params(model, jnp.zeros((1, T), jnp.int32))


@functools.lru_cache(maxsize=None)
def tiny_transformer(**kw):
  model = Transformer(
    TransformerConfig(**{**TINY, 'src_vocab_size': SRC_V, 'tgt_vocab_size': TGT_V, **kw})
  )
  return model, random_params(model, jnp.ones((1, S), jnp.int32), jnp.ones((1, T), jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, *args, **kwargs):
  """The non-cached forward pass, compiled (eager dispatch of every op is slower than compiling)."""
  return model.apply({'params': params}, *args, **kwargs)


def ids_of(shape, vocab, seed, low=0):
  return np.array(jax.random.randint(jax.random.key(seed), shape, low, vocab), np.int32)


PROMPT = ids_of((B, T), V, 3)
SRC = ids_of((B, S), SRC_V, 1, low=1)
SRC[0, 4:] = 0  # row 0 padded after 4 tokens (pad_id 0)


def left_padded_positions(valid):
  return np.maximum(np.cumsum(valid, axis=1) - 1, 0)


def gpt_full_logits(model, params, prompt, valid, new_tokens):
  """Non-cached forward over prompt + new tokens: ``(B, T + N, V)``."""
  ids = np.concatenate([prompt, new_tokens], axis=1)
  valid = np.concatenate([valid, np.ones(new_tokens.shape, bool)], axis=1)
  return np.asarray(
    forward(
      model,
      params,
      jnp.asarray(ids),
      valid=jnp.asarray(valid),
      positions=jnp.asarray(left_padded_positions(valid)),
    )
  )


def feed(prefilled, tokens):
  """Logits for every new token from the prefilled model, feeding ``tokens`` one by one: ``(B, N, V)``."""
  logits, cache = [prefilled.first_logits], prefilled.cache
  for j in range(tokens.shape[1] - 1):
    step_logits, cache = prefilled.step(cache, prefilled.rows, tokens[:, j], j)
    logits.append(step_logits)
  return jnp.stack(logits, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def gpt_cached_logits(model, params, prompt, valid, tokens):
  return feed(decoding.prefill_gpt(model, params, prompt, valid, tokens.shape[1]), tokens)


@functools.partial(jax.jit, static_argnums=(0, 5))
def translation_cached_logits(model, params, src, src_valid, tokens, bos):
  return feed(
    decoding.prefill_translation(model, params, src, src_valid, tokens.shape[1], bos), tokens
  )


# ---------------------------------------------------------------- cached decoding == full forward


@pytest.mark.parametrize('scan', [False, True], ids=['loop', 'scan'])
def test_gpt_cached_logits_equal_full_forward_with_left_padding(scan):
  model, params = tiny_gpt(scan_layers=scan)
  new = generate(
    model, params, PROMPT, max_new_tokens=N, prompt_valid=LEFT_PADDED, rng=jax.random.key(5)
  )
  cached = gpt_cached_logits(model, params, jnp.asarray(PROMPT), jnp.asarray(LEFT_PADDED), new)
  full = gpt_full_logits(model, params, PROMPT, LEFT_PADDED, np.asarray(new))
  np.testing.assert_allclose(np.asarray(cached), full[:, T - 1 : T - 1 + N], atol=1e-5, rtol=0)


def test_prefill_of_the_last_position_only_equals_its_row_of_every_position():
  """``decode_step(last_only=True)``, what a prefill runs: ``(B, 1, V)``, the last row of the full ``(B, T, V)``,
  and the same cache."""
  model, params = tiny_gpt()
  valid = jnp.asarray(LEFT_PADDED)
  positions = jnp.asarray(left_padded_positions(LEFT_PADDED))
  cache_valid = jnp.concatenate([valid, jnp.ones((B, N - 1), bool)], axis=1)
  slots = jnp.zeros(cache_valid.shape, jnp.int32)
  cache = decoding._empty_cache(
    model, params, GPT.decode_step, slots, positions=slots, cache_valid=cache_valid
  )

  @functools.partial(jax.jit, static_argnums=0)
  def prefill(last_only, cache):
    return model.apply(
      {'params': params, 'cache': cache},
      jnp.asarray(PROMPT),
      positions=positions,
      cache_valid=cache_valid,
      last_only=last_only,
      method=GPT.decode_step,
      mutable=['cache'],
    )

  (last, last_cache), (every, every_cache) = prefill(True, cache), prefill(False, cache)
  assert last.shape == (B, 1, V) and every.shape == (B, T, V)
  # one row or five: the head's product may take another kernel, so equal to float32 rounding
  np.testing.assert_allclose(np.asarray(last), np.asarray(every[:, -1:]), rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, last_cache, every_cache)


@pytest.mark.parametrize('scan', [False, True], ids=['loop', 'scan'])
def test_transformer_cached_logits_equal_full_forward_with_padded_source(scan):
  model, params = tiny_transformer(scan_layers=scan)
  bos = 1
  out = np.asarray(translate(model, params, SRC, max_len=N, bos_id=bos, eos_id=2))
  src_valid = jnp.asarray(SRC != 0)
  cached = translation_cached_logits(
    model, params, jnp.asarray(SRC), src_valid, jnp.asarray(out), bos
  )
  tgt_in = np.concatenate([np.full((B, 1), bos), out[:, :-1]], axis=1)
  full = forward(
    model,
    params,
    jnp.asarray(SRC),
    jnp.asarray(tgt_in),
    src_valid=src_valid,
    tgt_valid=jnp.ones(tgt_in.shape, bool),
  )
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- greedy == Hugging Face


@pytest.mark.parametrize('padded', [False, True], ids=['unpadded', 'left_padded'])
def test_greedy_equals_hugging_face_gpt2(padded):
  torch.manual_seed(0)
  hf_cfg = GPT2Config(
    n_layer=L,
    n_head=H,
    n_embd=D,
    vocab_size=V,
    n_positions=16,
    initializer_range=0.3,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  )
  hf = GPT2LMHeadModel(hf_cfg).eval()
  model, params = from_gpt2(hf)
  valid = LEFT_PADDED if padded else np.ones((B, T), bool)
  prompt = np.where(valid, PROMPT, 0)
  with torch.no_grad():
    expected = hf.generate(
      torch.tensor(prompt, dtype=torch.long),
      attention_mask=torch.tensor(valid, dtype=torch.long),
      max_new_tokens=N,
      min_new_tokens=N,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
    ).numpy()[:, T:]
  ours = generate(model, params, prompt, max_new_tokens=N, prompt_valid=valid, temperature=0)
  np.testing.assert_array_equal(np.asarray(ours), expected)


# ---------------------------------------------------------------- beam search


def brute_force_best(log_probs_of, vocab, n, eos, alpha):
  """Best ``(tokens, score)`` over every hypothesis ending at ``eos`` or after ``n`` tokens, by enumeration."""
  hyps = [
    h
    for length in range(1, n + 1)
    for h in itertools.product(range(vocab), repeat=length)
    if eos not in h[:-1] and (h[-1] == eos or length == n)
  ]
  # causal: the filler changes no score
  filled = np.array([list(h) + [eos] * (n - len(h)) for h in hyps])
  log_probs = log_probs_of(filled)  # (C, n, vocab) before each token
  scores = [
    log_probs[c, np.arange(len(h)), list(h)].sum() / len(h) ** alpha for c, h in enumerate(hyps)
  ]
  best = int(np.argmax(scores))
  return list(hyps[best]), scores[best]


BEAM_VOCAB, BEAM_N, BEAM_EOS = 4, 3, 2
# Wide enough that every candidate before the last step ranks within the top W: the search is then exact.
BEAM_WIDTH = BEAM_VOCAB * (BEAM_VOCAB - 1) ** (BEAM_N - 2)


@pytest.mark.parametrize('alpha', [0.0, 1.0, 2.5], ids=['no_penalty', 'penalty_1', 'penalty_2.5'])
@pytest.mark.parametrize('family', ['gpt', 'transformer'])
def test_beam_search_finds_the_brute_force_best(family, alpha):
  if family == 'gpt':
    model, params = tiny_gpt(vocab_size=BEAM_VOCAB)
    prompt = ids_of((1, 3), BEAM_VOCAB, 7)
    beams = beam_search(
      model,
      params,
      prompt,
      max_new_tokens=BEAM_N,
      beam_size=BEAM_WIDTH,
      length_penalty=alpha,
      eos_id=BEAM_EOS,
    )

    def log_probs_of(hyps):
      ids = np.concatenate([np.repeat(prompt, len(hyps), axis=0), hyps], axis=1)
      return jax.nn.log_softmax(forward(model, params, jnp.asarray(ids)))[:, 2 : 2 + BEAM_N]
  else:
    model, params = tiny_transformer(tgt_vocab_size=BEAM_VOCAB, pad_id=None)
    src, bos = SRC[:1, :4], 0
    beams = translate_beams(
      model,
      params,
      src,
      max_len=BEAM_N,
      bos_id=bos,
      eos_id=BEAM_EOS,
      beam_size=BEAM_WIDTH,
      length_penalty=alpha,
    )

    def log_probs_of(hyps):
      tgt_in = np.concatenate([np.full((len(hyps), 1), bos), hyps[:, :-1]], axis=1)
      return jax.nn.log_softmax(
        forward(model, params, jnp.asarray(np.repeat(src, len(hyps), axis=0)), jnp.asarray(tgt_in))
      )

  best, score = brute_force_best(
    lambda h: np.asarray(log_probs_of(h)), BEAM_VOCAB, BEAM_N, BEAM_EOS, alpha
  )
  pad = 0
  np.testing.assert_array_equal(np.asarray(beams.tokens[0, 0]), best + [pad] * (BEAM_N - len(best)))
  np.testing.assert_allclose(float(beams.scores[0, 0]), score, rtol=1e-5)
  assert np.all(np.diff(np.asarray(beams.scores[0])) <= 0), 'beams must come best first'


def first_emissions(free, token) -> list:
  """Per row, the index at which ``token`` is first emitted (``None`` if never)."""
  return [list(row).index(token) if token in row else None for row in free]


def eos_ending_mid_way(free) -> int:
  """A token that unconstrained decoding first emits strictly inside the ``N`` new tokens of some row, and at
  different steps in different rows: used as the end token, rows stop at different steps and the rest is padding."""
  for token in map(int, np.unique(free)):
    firsts = first_emissions(free, token)
    if any(f is not None and 1 <= f <= N - 2 for f in firsts) and len(set(firsts)) > 1:
      return token
  raise AssertionError(f'no token ends the rows of {free.tolist()} at different steps mid-way')


def test_beam_size_one_equals_greedy():
  # Without a length penalty, continuing past the greedy end token can only lower the score.
  model, params = tiny_gpt()
  free = np.asarray(
    generate(model, params, PROMPT, max_new_tokens=N, prompt_valid=LEFT_PADDED, temperature=0)
  )
  eos = eos_ending_mid_way(free)
  greedy = generate(
    model, params, PROMPT, max_new_tokens=N, prompt_valid=LEFT_PADDED, temperature=0, eos_id=eos
  )
  beams = beam_search(
    model,
    params,
    PROMPT,
    max_new_tokens=N,
    beam_size=1,
    length_penalty=0.0,
    prompt_valid=LEFT_PADDED,
    eos_id=eos,
  )
  np.testing.assert_array_equal(np.asarray(beams.tokens[:, 0]), np.asarray(greedy))

  # One layer: this tiny model's greedy translation varies (two layers repeat one token), so the end token can
  # stop it after its first word.
  t_model, t_params = tiny_transformer(num_layers=1)
  t_free = np.asarray(translate(t_model, t_params, SRC, max_len=N, bos_id=1, eos_id=TGT_V - 1))
  t_eos = int(t_free[0, 1])
  assert first_emissions(t_free, t_eos)[0] == 1, t_free  # decoding really ends mid-way
  t_greedy = translate(t_model, t_params, SRC, max_len=N, bos_id=1, eos_id=t_eos)
  t_beams = translate_beams(
    t_model, t_params, SRC, max_len=N, bos_id=1, eos_id=t_eos, beam_size=1, length_penalty=0.0
  )
  np.testing.assert_array_equal(np.asarray(t_beams.tokens[:, 0]), np.asarray(t_greedy))


# ---------------------------------------------------------------- stopping and repetition


def test_rows_finish_at_eos_and_are_padded_after_it():
  model, params = tiny_gpt()
  free = np.asarray(
    generate(model, params, PROMPT, max_new_tokens=N, prompt_valid=LEFT_PADDED, temperature=0)
  )
  eos = eos_ending_mid_way(free)  # one row ends while the other goes on
  stopped = np.asarray(
    generate(
      model,
      params,
      PROMPT,
      max_new_tokens=N,
      prompt_valid=LEFT_PADDED,
      temperature=0,
      eos_id=eos,
      pad_id=V - 1,
    )
  )
  for first, row_free, row in zip(first_emissions(free, eos), free, stopped):
    end = N if first is None else first + 1
    np.testing.assert_array_equal(row[:end], row_free[:end])
    assert np.all(row[end:] == V - 1)


@pytest.mark.parametrize('n', [1, 2], ids=['unigram', 'bigram'])
def test_no_repeat_ngram_never_repeats_an_ngram_of_the_row(n):
  model, params = tiny_gpt()
  prompt = PROMPT[:, :3]
  out = np.asarray(
    generate(model, params, prompt, max_new_tokens=N, temperature=0, no_repeat_ngram_size=n)
  )
  for row in np.concatenate([prompt, out], axis=1):
    grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
    assert len(grams) == len(set(grams)), f'repeated {n}-gram in {row}'


# ---------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_fixed_key():
  model, params = tiny_gpt()
  draw = lambda seed: np.asarray(
    generate(
      model,
      params,
      PROMPT,
      max_new_tokens=N,
      prompt_valid=LEFT_PADDED,  # noqa
      temperature=2.0,
      rng=jax.random.key(seed),
    )
  )
  np.testing.assert_array_equal(draw(0), draw(0))
  assert not np.array_equal(draw(0), draw(1)), 'different keys should give different samples'


def sampled_with_full_logits(batch, **settings):
  """Many sampled rows and the full-forward logits before each of their tokens: ``(R, N)``, ``(R, N, V)``."""
  model, params = tiny_gpt()
  prompt = np.repeat(PROMPT[:1], batch, axis=0)
  valid = np.ones(prompt.shape, bool)
  out = np.asarray(
    generate(model, params, prompt, max_new_tokens=N, rng=jax.random.key(3), **settings)
  )
  return out, gpt_full_logits(model, params, prompt, valid, out)[:, T - 1 : T - 1 + N]


def test_top_k_never_emits_outside_the_top_k():
  k = 3
  out, logits = sampled_with_full_logits(64, temperature=3.0, top_k=k)
  # tokens more likely than the one emitted
  rank = (logits > np.take_along_axis(logits, out[..., None], -1)).sum(-1)
  assert rank.max() < k
  assert rank.max() > 0, 'temperature 3 should sample below the top token'


def test_top_p_never_emits_outside_the_nucleus():
  top_p, temperature = 0.6, 2.0
  out, logits = sampled_with_full_logits(64, temperature=temperature, top_p=top_p)
  probs = np.asarray(jax.nn.softmax(logits / temperature, axis=-1))
  emitted = np.take_along_axis(probs, out[..., None], -1)[..., 0]
  # mass of strictly more likely tokens
  mass_above = np.where(probs > emitted[..., None], probs, 0).sum(-1)
  assert mass_above.max() < top_p
  assert (mass_above > 0).any(), 'the nucleus should hold more than the top token somewhere'


def test_temperature_near_zero_equals_greedy():
  model, params = tiny_gpt()
  greedy = generate(
    model, params, PROMPT, max_new_tokens=N, prompt_valid=LEFT_PADDED, temperature=0
  )
  cold = generate(
    model,
    params,
    PROMPT,
    max_new_tokens=N,
    prompt_valid=LEFT_PADDED,
    temperature=1e-6,
    rng=jax.random.key(9),
  )
  np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))


# ---------------------------------------------------------------- compiled once


@pytest.mark.parametrize('search', ['sample', 'beam'])
def test_decode_loop_is_traced_once(search, monkeypatch):
  model, params = tiny_gpt()
  counted = search_module.choose if search == 'sample' else search_module._top
  traces = []
  monkeypatch.setattr(
    search_module, counted.__name__, lambda *a, **kw: traces.append(1) or counted(*a, **kw)
  )
  batch, length = 3, 4  # a shape no other test compiles
  # new prompts, padding, keys and float settings: same shapes, so no new trace
  for seed in range(3):
    prompt = ids_of((batch, length), V, seed)
    valid = np.arange(length)[None] >= np.array([[0], [seed], [1]])
    if search == 'sample':
      generate(
        model,
        params,
        prompt,
        max_new_tokens=N,
        prompt_valid=valid,
        top_k=5,
        temperature=1 + seed,
        rng=jax.random.key(seed),
      )
    else:
      beam_search(
        model,
        params,
        prompt,
        max_new_tokens=N,
        beam_size=2,
        prompt_valid=valid,
        eos_id=1,
        length_penalty=seed / 2,
      )
  assert len(traces) == 2, 'one trace of the prefill choice and one of the loop body'


# ---------------------------------------------------------------- impossible requests

GPT_MODEL, GPT_PARAMS = tiny_gpt()


@pytest.mark.parametrize(
  'changes, message',
  [
    (dict(max_new_tokens=12), 'exceeds the model maximum'),
    (dict(max_new_tokens=0), 'max_new_tokens must be an integer >= 1'),
    (dict(top_p=0.0), r'top_p must lie in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must lie in \(0, 1\]'),
    (dict(top_k=0), 'top_k must be an integer >= 1'),
    (dict(temperature=-0.5), 'temperature must be >= 0'),
    (dict(prompt_ids=np.where(PROMPT == PROMPT[0, 0], V, PROMPT)), 'prompt ids out of range'),
    (dict(prompt_ids=PROMPT - 1 - PROMPT.max()), 'prompt ids out of range'),
    (dict(prompt_valid=LEFT_PADDED[:, ::-1]), 'left-padded'),
    (dict(eos_id=V), 'eos_id=37 is outside the vocabulary'),
    (dict(no_repeat_ngram_size=-1), 'no_repeat_ngram_size must be a non-negative integer'),
  ],
  ids=[
    'too_long',
    'no_new_tokens',
    'top_p_zero',
    'top_p_above_one',
    'top_k_zero',
    'negative_temperature',
    'id_too_large',
    'id_negative',
    'right_padding',
    'eos_outside_vocab',
    'negative_ngram',
  ],
)
def test_impossible_generate_requests_raise(changes, message):
  request = {**dict(prompt_ids=PROMPT, max_new_tokens=N, prompt_valid=LEFT_PADDED), **changes}
  with pytest.raises(ValueError, match=message):
    generate(GPT_MODEL, GPT_PARAMS, **request)


def test_beam_size_below_one_raises():
  with pytest.raises(ValueError, match='beam_size must be an integer >= 1'):
    beam_search(GPT_MODEL, GPT_PARAMS, PROMPT, max_new_tokens=N, beam_size=0)
  t_model, t_params = tiny_transformer()
  with pytest.raises(ValueError, match='beam_size must be an integer >= 1'):
    translate(t_model, t_params, SRC, max_len=N, bos_id=1, eos_id=2, beam_size=0)


@pytest.mark.parametrize(
  'changes, message',
  [
    (dict(max_len=17), 'exceeds the model maximum'),
    (dict(bos_id=TGT_V), 'bos_id=29 is outside the vocabulary'),
    (dict(src_ids=np.where(SRC == SRC[1, 0], SRC_V, SRC)), 'source ids out of range'),
  ],
  ids=['too_long', 'bos_outside_vocab', 'source_id_too_large'],
)
def test_impossible_translate_requests_raise(changes, message):
  t_model, t_params = tiny_transformer()
  request = {**dict(src_ids=SRC, max_len=N, bos_id=1, eos_id=2), **changes}
  with pytest.raises(ValueError, match=message):
    translate(t_model, t_params, **request)


def test_wrong_model_family_is_named():
  t_model, t_params = tiny_transformer()
  with pytest.raises(TypeError, match='expected a GPT model'):
    generate(t_model, t_params, PROMPT, max_new_tokens=N)
  with pytest.raises(TypeError, match='expected a Transformer model'):
    translate(GPT_MODEL, GPT_PARAMS, SRC, max_len=N, bos_id=1, eos_id=2)
