"""Activation functions by the names configs use."""

from typing import Callable

import jax

# 'gelu' is the exact erf form (torch.nn.GELU(), BERT); 'gelu_tanh' the tanh approximation (GPT-2's "gelu_new").
# jax.nn.gelu defaults to the approximation, so the flag is always spelled out.
ACTIVATIONS: dict[str, Callable] = {
  'relu': jax.nn.relu,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'silu': jax.nn.silu,  # x * sigmoid(x): the gate of SwiGLU (Llama, Mistral, Qwen2)
}
