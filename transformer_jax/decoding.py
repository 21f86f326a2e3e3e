"""The compiled decoding programs behind :mod:`transformer_jax.generation`: a model is prefilled (the prompt of a
GPT, or the encoded source and the start token of an encoder-decoder, in a fixed-size key/value cache), then one of
the search loops of :mod:`transformer_jax.search` runs. One program per search kind, compiled once per model, static
settings and shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transformer_jax.models.gpt import GPT
from transformer_jax.models.transformer import Transformer
from transformer_jax.search import PrefilledModel, beam_loop, sample_loop


def _empty_cache(model, params, method, *args, **kwargs):
  """Zeroed cache whose buffers have the length of the dummy input in ``args`` (shapes only: nothing runs)."""
  shapes = jax.eval_shape(
    lambda: model.apply({'params': params}, *args, method=method, mutable=['cache'], **kwargs)[1][
      'cache'
    ]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _apply_step(model, params, cache, method, *args, **kwargs):
  """One cached call; returns the last position's ``(R, V)`` logits and the updated cache."""
  logits, variables = model.apply(
    {'params': params, 'cache': cache}, *args, method=method, mutable=['cache'], **kwargs
  )
  return logits[:, -1], variables['cache']


def prefill_gpt(
  model: GPT, params, prompt_ids, prompt_valid, max_new_tokens: int
) -> PrefilledModel:
  """Prefills left-padded prompts into a cache of ``T + N - 1`` slots (the last new token is never fed)."""
  batch, prompt_len = prompt_ids.shape
  slots = prompt_len + max_new_tokens - 1
  # (B, T): real tokens count from 0
  positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
  # (B, S)
  cache_valid = jnp.concatenate(
    [prompt_valid, jnp.ones((batch, max_new_tokens - 1), jnp.bool_)], axis=1
  )
  dummy = jnp.zeros((batch, slots), jnp.int32)
  cache = _empty_cache(
    model, params, GPT.decode_step, dummy, positions=dummy, cache_valid=cache_valid
  )
  first_logits, cache = _apply_step(
    model,
    params,
    cache,
    GPT.decode_step,
    prompt_ids,
    positions=positions,
    cache_valid=cache_valid,
    last_only=True,
  )

  def step(cache, rows, tokens, j):
    lengths, cache_valid = rows
    return _apply_step(
      model,
      params,
      cache,
      GPT.decode_step,
      tokens[:, None],
      positions=(lengths + j)[:, None],
      cache_valid=cache_valid,
    )

  rows = (prompt_valid.sum(axis=1), cache_valid)
  return PrefilledModel(first_logits, cache, rows, step, prompt_ids, prompt_valid)


def prefill_translation(
  model: Transformer, params, src_ids, src_valid, max_len: int, bos_id: int
) -> PrefilledModel:
  """Encodes the source, caches its cross-attention keys/values and prefills the start token."""
  batch = src_ids.shape[0]
  # (B, S, D)
  memory = model.apply({'params': params}, src_ids, src_valid=src_valid, method=Transformer.encode)
  bos = jnp.full((batch, 1), bos_id, jnp.int32)
  dummy = jnp.zeros((batch, max_len), jnp.int32)
  cache = _empty_cache(
    model, params, Transformer.decode_step, dummy, memory, positions=dummy, memory_valid=src_valid
  )
  first_logits, cache = _apply_step(
    model,
    params,
    cache,
    Transformer.decode_step,
    bos,
    memory,
    positions=jnp.zeros_like(bos),
    memory_valid=src_valid,
  )

  def step(cache, memory_valid, tokens, j):
    positions = jnp.full((tokens.shape[0], 1), j + 1)  # the start token holds position 0
    return _apply_step(
      model,
      params,
      cache,
      Transformer.decode_step,
      tokens[:, None],
      None,
      positions=positions,
      memory_valid=memory_valid,
    )

  return PrefilledModel(first_logits, cache, src_valid, step, bos, jnp.ones_like(bos, jnp.bool_))


# ----------------------------------------------------------------------------------------------------------------------
# Compiled programs: one per search kind, keyed by the model and the static settings


@functools.partial(jax.jit, static_argnums=(0, 1))
def compiled_generate(model, settings, params, floats, prompt_ids, prompt_valid, rng):
  prefilled = prefill_gpt(model, params, prompt_ids, prompt_valid, settings.max_new_tokens)
  return sample_loop(prefilled, settings, floats, rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def compiled_beam_search_gpt(model, settings, params, floats, prompt_ids, prompt_valid):
  return beam_loop(
    prefill_gpt(model, params, prompt_ids, prompt_valid, settings.max_new_tokens), settings, floats
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def compiled_translate_greedy(model, settings, bos_id, params, floats, src_ids, src_valid):
  prefilled = prefill_translation(
    model, params, src_ids, src_valid, settings.max_new_tokens, bos_id
  )
  # greedy: the key is never used
  return sample_loop(prefilled, settings, floats, jax.random.key(0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def compiled_translate_beams(model, settings, bos_id, params, floats, src_ids, src_valid):
  prefilled = prefill_translation(
    model, params, src_ids, src_valid, settings.max_new_tokens, bos_id
  )
  return beam_loop(prefilled, settings, floats)
