"""The Llama, Mistral and Qwen2 specs: Hugging Face's ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``Qwen2ForCausalLM`` <-> our :class:`~transformer_jax.GPT` with Llama's blocks (:data:`LLAMA_BLOCKS`).

Both are the same decoder: pre-norm RMSNorm layers, rotary positions in the ``rotate_half`` layout, grouped-query
attention, a SwiGLU FFN (``down(silu(gate(x)) * up(x))``: our ``fc_gate``, ``fc_in``, ``fc_out``), no biases, a final
RMSNorm and a head that may or may not be tied. Mistral adds a sliding window (our ``sliding_window``; a Mistral
without one is saved back as a Llama, the same model), Qwen2 biases to Q, K and V alone (our ``qkv_bias``), and one
name table serves all three. ``pad_token_id`` is not read: with ``pad_id`` set our GPT would mask every such token
when no ``valid`` is passed, which transformers never does (Qwen2's padding token is its end-of-text token).
"""

from __future__ import annotations

from transformer_jax.convert.hf_options import HF_ACTIVATIONS, activation, refuse
from transformer_jax.convert.rules import ConversionError, Mapping, Rule, dense, qkv, require, table
from transformer_jax.convert.spec import Spec, export, load
from transformer_jax.models import GPT, GPTConfig
from transformer_jax.models.gpt import LLAMA_BLOCKS

# Our field -> the LlamaConfig/Qwen2Config key, and their defaults for the keys a config.json may omit.
_FIELDS = {
  'vocab_size': 'vocab_size',
  'max_len': 'max_position_embeddings',
  'num_layers': 'num_hidden_layers',
  'd_model': 'hidden_size',
  'num_heads': 'num_attention_heads',
  'd_ff': 'intermediate_size',
  'norm_eps': 'rms_norm_eps',
  'attention_dropout_rate': 'attention_dropout',
  'tie_output': 'tie_word_embeddings',
}
_LLAMA_DEFAULTS = {
  'max_position_embeddings': 2048,
  'rms_norm_eps': 1e-6,
  'attention_dropout': 0.0,
  'tie_word_embeddings': False,
}
_QWEN2_DEFAULTS = {**_LLAMA_DEFAULTS, 'max_position_embeddings': 32768}
_MISTRAL_DEFAULTS = {
  **_LLAMA_DEFAULTS,
  'max_position_embeddings': 4096 * 32,
  'sliding_window': 4096,
}
# Hugging Face rope_type -> ours (None: plain rotary positions)
_ROPE_TYPES = {'default': None, 'linear': 'linear', 'llama3': 'llama3'}


def _rope_parameters(hf: dict) -> dict:
  """``rope_parameters`` (transformers 5), else the older top-level ``rope_theta`` and ``rope_scaling``."""
  rope = hf.get('rope_parameters')
  if rope is None:
    rope = {'rope_theta': hf.get('rope_theta', 10000.0), **(hf.get('rope_scaling') or {})}
  if 'rope_type' not in rope:
    rope = {**rope, 'rope_type': rope.get('type', 'default')}  # the pre-4.45 spelling
  if any(isinstance(v, dict) for v in rope.values()):
    raise ConversionError('per-layer-type rope_parameters are not supported')
  if rope['rope_type'] not in _ROPE_TYPES:
    raise ConversionError(
      f'unsupported rope_type {rope["rope_type"]!r}; supported: {sorted(_ROPE_TYPES)}'
    )
  if rope.get('partial_rotary_factor', 1.0) != 1.0:
    raise ConversionError('Llama rotates whole heads: partial_rotary_factor must be 1.0')
  return rope


def _more_from_hf(hf: dict, qkv_bias: bool) -> dict:
  heads, width = hf['num_attention_heads'], hf['hidden_size']
  if hf.get('head_dim') not in (None, width // heads):
    raise ConversionError(
      f'head_dim={hf["head_dim"]} is not hidden_size / num_attention_heads = {width // heads}: '
      'our attention splits d_model into its heads'
    )
  # Qwen2's Q/K/V biases are fixed in its code; Llama's attention_bias adds one to o_proj as well, which no field of
  # ours expresses without FFN biases
  refuse(hf, attention_bias=(False,), mlp_bias=(False,), use_sliding_window=(False,))
  if any(kind != 'full_attention' for kind in hf.get('layer_types') or ()):
    raise ConversionError(f'only full attention is supported, got layer_types={hf["layer_types"]}')
  rope = _rope_parameters(hf)
  scaling = dict(rope_scaling=_ROPE_TYPES[rope['rope_type']])
  if scaling['rope_scaling']:
    scaling['rope_scaling_factor'] = rope['factor']
  if scaling['rope_scaling'] == 'llama3':
    scaling.update(
      rope_low_freq_factor=rope['low_freq_factor'],
      rope_high_freq_factor=rope['high_freq_factor'],
      rope_original_max_len=rope['original_max_position_embeddings'],
    )
  kv_heads = hf.get('num_key_value_heads') or heads
  return dict(
    **LLAMA_BLOCKS,
    qkv_bias=qkv_bias,
    num_kv_heads=None if kv_heads == heads else kv_heads,
    activation=activation(hf.get('hidden_act', 'silu')),
    init_std=hf.get('initializer_range', 0.02),
    rope_theta=float(rope.get('rope_theta', 10000.0)),  # both configs' default
    **scaling,
  )


def _more_to_hf(config: GPTConfig, architecture: str) -> dict:
  rope = {'rope_type': config.rope_scaling or 'default', 'rope_theta': config.rope_theta}
  if config.rope_scaling:
    rope['factor'] = config.rope_scaling_factor
  if config.rope_scaling == 'llama3':
    rope.update(
      low_freq_factor=config.rope_low_freq_factor,
      high_freq_factor=config.rope_high_freq_factor,
      original_max_position_embeddings=config.rope_original_max_len,
    )
  extra = {} if config.qkv_bias else dict(attention_bias=False, mlp_bias=False)
  return dict(
    num_key_value_heads=config.kv_heads,
    head_dim=config.head_dim,
    hidden_act=HF_ACTIVATIONS[config.activation],
    initializer_range=config.init_std or 0.02,
    rope_parameters=rope,
    **extra,
  )


def _check(config: GPTConfig, what: str, qkv_bias: bool, window: bool) -> None:
  """Raises :class:`ConversionError` for a model ``what`` (Llama, Mistral or Qwen2) cannot express; ``window``:
  whether it has a ``sliding_window`` field."""
  if config.rope_theta is None:
    raise ConversionError(
      f'{what} cannot express this model: rope_theta=None (needs rotary positions)'
    )
  require(
    config,
    what,
    norm_type=('rms_norm',),
    norm_scale_plus_one=(False,),
    gated_ffn=(True,),
    use_bias=(False,),
    qkv_bias=(qkv_bias,),
    pre_norm=(True,),
    final_norm=(True,),
    output_bias=(False,),
    position_encoding=('none',),
    position_offset=(0,),
    embed_norm=(False,),
    attention_scale=(None,),
    rotary_fraction=(1.0,),
    activation=tuple(HF_ACTIVATIONS),
  )
  if config.sliding_window is not None and not window:
    raise ConversionError(
      f'{what} cannot express this model: sliding_window={config.sliding_window} (Mistral can)'
    )


def _mapping(config: GPTConfig, architecture: str) -> Mapping:
  """HF names (``model.`` prefixed, ``lm_head`` at the top) -> ours; every projection is an ``nn.Linear``."""
  rules = [table('token_embed', 'model.embed_tokens.weight')]
  for i in range(config.num_layers):
    ours, h = f'decoder/layers_{i}', f'model.layers.{i}.'
    sources = [
      tuple((f'{h}self_attn.{n}_proj.{leaf}',) for n in 'qkv') for leaf in ('weight', 'bias')
    ]
    rules += qkv(
      f'{ours}/self_attention',
      sources[0],
      sources[1] if config.qkv_bias else None,
      fused=config.fused_qkv,
    )
    rules += dense(f'{ours}/self_attention/out', f'{h}self_attn.o_proj', n_in=2, bias=False)
    for name, theirs in (('fc_gate', 'gate_proj'), ('fc_in', 'up_proj'), ('fc_out', 'down_proj')):
      rules += dense(f'{ours}/ffn/{name}', f'{h}mlp.{theirs}', bias=False)
    rules.append(Rule(f'{ours}/self_attention_norm/scale', (f'{h}input_layernorm.weight',), 0))
    rules.append(Rule(f'{ours}/ffn_norm/scale', (f'{h}post_attention_layernorm.weight',), 0))
  rules.append(Rule('decoder/final_norm/scale', ('model.norm.weight',), 0))
  if config.tie_output:
    aliases = {'lm_head.weight': 'model.embed_tokens.weight'}
  else:
    rules += dense('output', 'lm_head', bias=False)
    aliases = {}
  # older checkpoints saved the rotary frequencies
  return Mapping(
    tuple(rules), aliases, buffers=(r'model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq',)
  )


def _spec(
  model_type: str, architecture: str, defaults: dict, qkv_bias: bool, what: str, window=False
) -> Spec:
  return Spec(
    model_type=model_type,
    architectures={architecture: GPT},
    config_class=GPTConfig,
    fields={**_FIELDS, 'sliding_window': 'sliding_window'} if window else _FIELDS,
    hf_defaults=defaults,
    more_from_hf=lambda hf: _more_from_hf(hf, qkv_bias),
    more_to_hf=_more_to_hf,
    check=lambda config: _check(config, what, qkv_bias, window),
    mapping=_mapping,
    architecture_of_state=lambda state: architecture,
    # GPT-2 takes the GPTs with learned positions; of the rest, Q/K/V biases mean Qwen2, a window Mistral
    describes=lambda config: (
      config.position_encoding != 'learned'
      and config.qkv_bias == qkv_bias
      and (config.sliding_window is not None) == window
    ),
  )


LLAMA = _spec('llama', 'LlamaForCausalLM', _LLAMA_DEFAULTS, qkv_bias=False, what='Llama')
MISTRAL = _spec(
  'mistral', 'MistralForCausalLM', _MISTRAL_DEFAULTS, qkv_bias=False, what='Mistral', window=True
)
QWEN2 = _spec('qwen2', 'Qwen2ForCausalLM', _QWEN2_DEFAULTS, qkv_bias=True, what='Qwen2')


def from_llama(model_or_state, config=None, *, dtype=None) -> tuple[GPT, dict]:
  """``LlamaForCausalLM`` (or a state dict plus its config, a ``LlamaConfig`` or dict) -> ``(GPT, params)``.
  ``dtype``: the params' dtype (default: the checkpoint's)."""
  return load(LLAMA, model_or_state, config, dtype=dtype)


def to_llama(model: GPT, params: dict, *, as_torch: bool = False) -> dict:
  """Our GPT params -> a ``LlamaForCausalLM`` state dict (numpy, or torch tensors)."""
  return export(LLAMA, model, params, 'LlamaForCausalLM', as_torch)


def from_mistral(model_or_state, config=None, *, dtype=None) -> tuple[GPT, dict]:
  """``MistralForCausalLM`` (or a state dict plus its config) -> ``(GPT, params)``."""
  return load(MISTRAL, model_or_state, config, dtype=dtype)


def to_mistral(model: GPT, params: dict, *, as_torch: bool = False) -> dict:
  """Our GPT params -> a ``MistralForCausalLM`` state dict (numpy, or torch tensors)."""
  return export(MISTRAL, model, params, 'MistralForCausalLM', as_torch)


def from_qwen2(model_or_state, config=None, *, dtype=None) -> tuple[GPT, dict]:
  """``Qwen2ForCausalLM`` (or a state dict plus its config) -> ``(GPT, params)``."""
  return load(QWEN2, model_or_state, config, dtype=dtype)


def to_qwen2(model: GPT, params: dict, *, as_torch: bool = False) -> dict:
  """Our GPT params -> a ``Qwen2ForCausalLM`` state dict (numpy, or torch tensors)."""
  return export(QWEN2, model, params, 'Qwen2ForCausalLM', as_torch)
