"""Decoding NNX models with :mod:`transformer_jax.generation`, unchanged: each function splits the model into its
Linen module and a params tree of its own arrays (:func:`~transformer_jax.nnx.to_linen`, no copy) and calls the Linen
function of the same name, whose options it takes.

    tokens = generate(model, prompt_ids, max_new_tokens=32, top_p=0.9, rng=jax.random.key(0))   # (B, 32)
    beams = beam_search(model, prompt_ids, max_new_tokens=32, beam_size=4)

The compiled decoding programs are keyed by the Linen module, which an NNX model keeps for life: training the model
changes the params it passes, not the program, so each batch shape and setting compiles once.
"""

from __future__ import annotations

from transformer_jax import generation
from transformer_jax.nnx.models import GPT, Transformer, to_linen


def generate(model: GPT, prompt_ids, **options):
  """:func:`transformer_jax.generate` of an NNX :class:`~transformer_jax.nnx.GPT`: ``(B, max_new_tokens)`` ids."""
  return generation.generate(*to_linen(model), prompt_ids, **options)


def beam_search(model: GPT, prompt_ids, **options) -> generation.Beams:
  """:func:`transformer_jax.beam_search` of an NNX :class:`~transformer_jax.nnx.GPT`."""
  return generation.beam_search(*to_linen(model), prompt_ids, **options)


def translate(model: Transformer, src_ids, **options):
  """:func:`transformer_jax.translate` of an NNX :class:`~transformer_jax.nnx.Transformer`."""
  return generation.translate(*to_linen(model), src_ids, **options)


def translate_beams(model: Transformer, src_ids, **options) -> generation.Beams:
  """:func:`transformer_jax.translate_beams` of an NNX :class:`~transformer_jax.nnx.Transformer`."""
  return generation.translate_beams(*to_linen(model), src_ids, **options)
