"""What the Hugging Face specs share: activation names both ways, refusing options we do not implement, and config
dicts from any of the forms users hold."""

from __future__ import annotations

from transformer_jax.convert.rules import ConversionError

# Hugging Face activation names -> ours; 'gelu_new' is GPT-2's tanh approximation.
ACTIVATIONS = {
  'gelu_new': 'gelu_tanh',
  'gelu_pytorch_tanh': 'gelu_tanh',
  'gelu': 'gelu',
  'relu': 'relu',
  'swish': 'silu',  # Marian's
  'silu': 'silu',
}
HF_ACTIVATIONS = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu', 'silu': 'silu'}


def activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise ConversionError(f'unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def refuse(hf: dict, **unsupported) -> None:
  """Raises for Hugging Face options whose value would change the numbers and that we do not implement."""
  bad = [f'{k}={hf[k]!r}' for k, ok in unsupported.items() if k in hf and hf[k] not in ok]
  if bad:
    raise ConversionError('unsupported Hugging Face config options: ' + ', '.join(bad))


def hf_config_dict(model_or_config) -> dict:
  """A ``transformers`` model, its config object, or a ``config.json`` dict -> the dict."""
  config = getattr(model_or_config, 'config', model_or_config)
  return config if isinstance(config, dict) else config.to_dict()
