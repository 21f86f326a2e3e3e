"""The T5 spec: Hugging Face's ``T5ForConditionalGeneration``, ``T5Model`` and ``T5EncoderModel`` (T5 v1.0, v1.1,
Flan-T5) <-> our :class:`~transformer_jax.Transformer` and :class:`~transformer_jax.EncoderModel` with the T5 preset's
blocks (:data:`~transformer_jax.models.transformer.T5_BLOCKS`).

The head: transformers 5 reads the rescale of the decoder output from ``scale_decoder_outputs`` (older configs: from
``tie_word_embeddings``), and ties ``lm_head`` to the shared table unless the checkpoint holds a different one. Both
are read the same way here, the second off the weights.
"""

from __future__ import annotations

import numpy as np

from transformer_jax.convert.hf_options import HF_ACTIVATIONS, activation
from transformer_jax.convert.rules import ConversionError, Mapping, Rule, dense, qkv, require, table
from transformer_jax.convert.spec import Spec, export, load
from transformer_jax.models import EncoderModel, Transformer, TransformerConfig
from transformer_jax.models.transformer import T5_BLOCKS

ARCHITECTURES = {
  'T5ForConditionalGeneration': Transformer,
  'T5Model': Transformer,
  'T5EncoderModel': EncoderModel,
}
# Our field -> the T5Config key, and T5Config's defaults for the keys a config.json may omit.
_FIELDS = {
  'src_vocab_size': 'vocab_size',
  'd_model': 'd_model',
  'num_layers': 'num_layers',
  'num_heads': 'num_heads',
  'd_ff': 'd_ff',
  'norm_eps': 'layer_norm_epsilon',
  'dropout_rate': 'dropout_rate',
  'pad_id': 'pad_token_id',
  'relative_buckets': 'relative_attention_num_buckets',
  'relative_max_distance': 'relative_attention_max_distance',
}
_HF_DEFAULTS = {
  'layer_norm_epsilon': 1e-6,
  'dropout_rate': 0.1,
  'pad_token_id': 0,
  'relative_attention_num_buckets': 32,
  'relative_attention_max_distance': 128,
}
# Old checkpoints carry a relative-position table for the decoder's cross-attention that T5 never reads.
_UNUSED = (r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight',)


def _with_weights(hf: dict, state: dict) -> dict:
  """The head as transformers 5 builds it: tied unless ``lm_head.weight`` differs from ``shared.weight``."""
  scale = hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True) is not False)
  head, shared = state.get('lm_head.weight'), state.get('shared.weight')
  tied = head is None or (shared is not None and np.array_equal(head, shared))
  return {**hf, 'scale_decoder_outputs': scale, 'tie_word_embeddings': tied}


def _check_head_dim(hf: dict) -> None:
  """Our attention splits d_model into num_heads heads; T5's d_kv is free."""
  d_kv, heads, width = hf.get('d_kv', 64), hf['num_heads'], hf['d_model']
  if d_kv * heads != width:
    raise ConversionError(
      f'T5 d_kv={d_kv} with num_heads={heads} is an attention {d_kv * heads} wide, but ours is d_model={width} '
      f'wide (head_dim = d_model // num_heads): this checkpoint cannot be expressed'
    )


def _ffn_from_hf(proj: str) -> dict:
  gated = proj.startswith('gated-')
  # transformers reads 'gated-gelu' as GPT-2's tanh approximation ('gelu_new'), as T5 v1.1 was trained
  act = 'gelu_tanh' if proj == 'gated-gelu' else activation(proj.removeprefix('gated-'))
  return dict(gated_ffn=gated, activation=act)


def _ffn_to_hf(config: TransformerConfig) -> str:
  if config.gated_ffn and config.activation == 'gelu_tanh':
    return 'gated-gelu'
  return ('gated-' if config.gated_ffn else '') + HF_ACTIVATIONS[config.activation]


def _more_from_hf(hf: dict) -> dict:
  _check_head_dim(hf)
  start = hf.get('decoder_start_token_id')
  return dict(
    **T5_BLOCKS,
    **_ffn_from_hf(hf.get('feed_forward_proj', 'relu')),
    tgt_vocab_size=hf['vocab_size'],
    num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
    # T5 drops attention weights at its one dropout rate
    attention_dropout_rate=hf.get('dropout_rate', 0.1),
    # relative positions have no limit: this only bounds the inputs
    max_len=hf.get('n_positions', 512),
    decoder_start_id=hf.get('pad_token_id', 0) if start is None else start,
    tie_output=hf['tie_word_embeddings'],
    scale_decoder_output=hf['scale_decoder_outputs'],
  )


def _more_to_hf(config: TransformerConfig, architecture: str) -> dict:
  start = config.pad_id if config.decoder_start_id is None else config.decoder_start_id
  return dict(
    d_kv=config.head_dim,
    num_decoder_layers=config.decoder_layers,
    feed_forward_proj=_ffn_to_hf(config),
    tie_word_embeddings=config.tie_output,
    scale_decoder_outputs=config.scale_decoder_output,
    n_positions=config.max_len,
    decoder_start_token_id=start,
    eos_token_id=1,  # T5's end token; our configs carry none
    is_encoder_decoder=architecture != 'T5EncoderModel',
  )


def check_t5(config: TransformerConfig) -> None:
  """Raises :class:`ConversionError` for a model T5 cannot express."""
  require(
    config,
    'T5',
    **{k: (v,) for k, v in T5_BLOCKS.items()},
    rope_theta=(None,),
    grouped_query=(False,),
    embed_norm=(False,),
    norm_scale_plus_one=(False,),
    activation=tuple(HF_ACTIVATIONS),
  )
  if config.gated_ffn and config.activation == 'gelu':
    raise ConversionError(
      "T5 cannot express this model: a gated FFN with the exact GELU (its 'gated-gelu' is the tanh one)"
    )


def _rms(ours: str, torch: str) -> list[Rule]:
  return [Rule(f'{ours}/scale', (f'{torch}.weight',), 0)]


def _attention(ours: str, theirs: str, fused: bool) -> list[Rule]:
  weights = tuple((f'{theirs}.{n}.weight',) for n in 'qkv')
  return qkv(ours, weights, None, fused=fused) + dense(
    f'{ours}/out', f'{theirs}.o', n_in=2, bias=False
  )


def _ffn(config: TransformerConfig, ours: str, theirs: str) -> list[Rule]:
  # wi_0 is the gate: act(x wi_0) * (x wi_1)
  ins = [('fc_gate', 'wi_0'), ('fc_in', 'wi_1')] if config.gated_ffn else [('fc_in', 'wi')]
  rules = [r for a, b in ins for r in dense(f'{ours}/{a}', f'{theirs}.{b}', bias=False)]
  return rules + dense(f'{ours}/fc_out', f'{theirs}.wo', bias=False)


def _stack(config: TransformerConfig, stack: str, count: int) -> list[Rule]:
  """One T5Stack: its first layer's relative position table (ours is the stack's), the layers, the final norm."""
  decoder = stack == 'decoder'
  rules = [
    table(
      f'{stack}/relative_position_bias',
      f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
    )
  ]
  sublayers = ('self_attention', 'cross_attention', 'ffn') if decoder else ('self_attention', 'ffn')
  for i in range(count):
    ours, h = f'{stack}/layers_{i}', f'{stack}.block.{i}.layer.'
    for j, name in enumerate(sublayers):
      rules += _rms(f'{ours}/{name}_norm', f'{h}{j}.layer_norm')
    rules += _attention(f'{ours}/self_attention', f'{h}0.SelfAttention', config.fused_qkv)
    if decoder:
      rules += _attention(f'{ours}/cross_attention', f'{h}1.EncDecAttention', fused=False)
    rules += _ffn(config, f'{ours}/ffn', f'{h}{len(sublayers) - 1}.DenseReluDense')
  return rules + _rms(f'{stack}/final_norm', f'{stack}.final_layer_norm')


def _mapping(config: TransformerConfig, architecture: str) -> Mapping:
  """HF T5 names -> ours: ``shared`` is our source table, which the decoder (and a tied head) read too."""
  rules = [table('source_embed', 'shared.weight'), *_stack(config, 'encoder', config.num_layers)]
  aliases = {'encoder.embed_tokens.weight': 'shared.weight'}
  if architecture == 'T5EncoderModel':
    return Mapping(tuple(rules), aliases, buffers=_UNUSED)
  rules += _stack(config, 'decoder', config.decoder_layers)
  aliases['decoder.embed_tokens.weight'] = 'shared.weight'
  if architecture == 'T5Model':
    if not config.tie_output:
      raise ConversionError('T5Model has no head: it holds no lm_head for an untied output')
  elif config.tie_output:
    aliases['lm_head.weight'] = 'shared.weight'
  else:
    rules += dense('output', 'lm_head', bias=False)
  return Mapping(tuple(rules), aliases, buffers=_UNUSED)


def _architecture_of_state(state: dict) -> str:
  # A tied head is not saved: T5Model's weights look like T5ForConditionalGeneration's, and load as one.
  if any(k.startswith('decoder.') for k in state):
    return 'T5ForConditionalGeneration'
  return 'T5EncoderModel'


T5 = Spec(
  model_type='t5',
  architectures=ARCHITECTURES,
  config_class=TransformerConfig,
  fields=_FIELDS,
  hf_defaults=_HF_DEFAULTS,
  more_from_hf=_more_from_hf,
  more_to_hf=_more_to_hf,
  check=check_t5,
  mapping=_mapping,
  architecture_of_state=_architecture_of_state,
  describes=lambda config: config.position_encoding == 'relative',
  with_weights=_with_weights,
)


def from_t5(model_or_state, config=None, *, dtype=None) -> tuple:
  """``T5ForConditionalGeneration``/``T5Model`` (or a state dict plus its config) -> ``(Transformer, params)``;
  ``T5EncoderModel`` -> ``(EncoderModel, params)``. ``dtype``: the params' dtype (default: the checkpoint's)."""
  return load(T5, model_or_state, config, dtype=dtype)


def to_t5(model, params: dict, *, architecture: str | None = None, as_torch: bool = False) -> dict:
  """Our params -> the state dict of ``architecture`` (default ``T5ForConditionalGeneration`` for a
  :class:`~transformer_jax.Transformer`, ``T5EncoderModel`` for an :class:`~transformer_jax.EncoderModel`)."""
  if architecture is not None and ARCHITECTURES.get(architecture) is not type(model):
    raise ConversionError(
      f'a {type(model).__name__} does not export as {architecture!r}; it exports as one of '
      f'{sorted(a for a, cls in ARCHITECTURES.items() if cls is type(model))}'
    )
  return export(T5, model, params, architecture, as_torch)
