"""Weights between PyTorch and transformer_jax, both ways, checked name by name and shape by shape.

Load (torch is imported only when you pass torch objects; safetensors need no torch)::

    from transformer_jax.convert import load_hf, save_hf
    model, params = load_hf('path/to/gpt2-or-bert')        # config.json + model.safetensors / pytorch_model.bin
    logits = model.apply({'params': params}, ids)

Sources: Hugging Face directories (:func:`load_hf`, :func:`save_hf`); ``transformers`` modules or state dicts
(:func:`from_gpt2`/:func:`to_gpt2`, :func:`from_bert`/:func:`to_bert`, :func:`from_llama`/:func:`to_llama`,
:func:`from_mistral`/:func:`to_mistral`, :func:`from_qwen2`/:func:`to_qwen2`); ``torch.nn.Transformer`` with its
embeddings and output layer (:func:`from_torch_transformer`/:func:`to_torch_transformer`); the PyTorch reference
models of :mod:`transformer_jax.torch_reference` (:func:`from_reference_transformer`, :func:`from_reference_gpt`
and their ``to_`` twins). Every ``from_*`` returns ``(model, params)``; every ``to_*`` a state dict of numpy arrays
(torch tensors with ``as_torch=True``) ready for ``load_state_dict``. Any mismatch raises :class:`ConversionError`
listing every offending weight.
"""

from transformer_jax.convert.bert import from_bert, to_bert
from transformer_jax.convert.course_models import (
  from_reference_gpt,
  from_reference_transformer,
  to_reference_gpt,
  to_reference_transformer,
)
from transformer_jax.convert.gpt2 import from_gpt2, to_gpt2
from transformer_jax.convert.hf_directory import load_hf, save_hf
from transformer_jax.convert.llama import (
  from_llama,
  from_mistral,
  from_qwen2,
  to_llama,
  to_mistral,
  to_qwen2,
)
from transformer_jax.convert.peft import load_peft, save_peft
from transformer_jax.convert.rules import ConversionError, Mapping, Rule
from transformer_jax.convert.spec import Spec
from transformer_jax.convert.t5 import from_t5, to_t5
from transformer_jax.convert.torch_transformer import from_torch_transformer, to_torch_transformer

__all__ = [
  'ConversionError',
  'Mapping',
  'Rule',
  'Spec',
  'from_bert',
  'from_gpt2',
  'from_llama',
  'from_mistral',
  'from_qwen2',
  'from_reference_gpt',
  'from_reference_transformer',
  'from_t5',
  'from_torch_transformer',
  'load_hf',
  'load_peft',
  'save_hf',
  'save_peft',
  'to_bert',
  'to_gpt2',
  'to_llama',
  'to_mistral',
  'to_qwen2',
  'to_reference_gpt',
  'to_reference_transformer',
  'to_t5',
  'to_torch_transformer',
]
