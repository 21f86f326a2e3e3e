"""The BART and Marian specs: Hugging Face's ``BartForConditionalGeneration``, ``BartModel`` and ``MarianMTModel``
<-> our encoder-decoder :class:`~transformer_jax.Transformer`.

Marian is BART's layout with other embeddings: the same post-norm layers and parameter names, static sinusoidal
positions (sines then cosines) instead of learned ones offset by 2, no norm on the embeddings, and optionally separate
source and target vocabularies. Both add ``final_logits_bias`` to a head tied to the target embedding.
"""

from __future__ import annotations

from transformer_jax.convert.hf_options import HF_ACTIVATIONS, activation, refuse
from transformer_jax.convert.rules import (
  CLASSIC_BLOCKS,
  ConversionError,
  Mapping,
  Rule,
  dense,
  norm,
  qkv,
  require,
  table,
)
from transformer_jax.convert.spec import Spec, export, load
from transformer_jax.models import Transformer, TransformerConfig

# Our field -> the config.json key, shared by BartConfig and MarianConfig. The encoder's sizes stand for both stacks;
# `_check_stacks` refuses a checkpoint whose decoder differs.
_FIELDS = {
  'src_vocab_size': 'vocab_size',
  'd_model': 'd_model',
  'num_layers': 'encoder_layers',
  'num_heads': 'encoder_attention_heads',
  'd_ff': 'encoder_ffn_dim',
  'dropout_rate': 'dropout',
  'attention_dropout_rate': 'attention_dropout',
  'pad_id': 'pad_token_id',
  'scale_embeddings': 'scale_embedding',
}
_BART_DEFAULTS = {
  'dropout': 0.1,
  'attention_dropout': 0.0,
  'pad_token_id': 1,
  'scale_embedding': False,
}
_MARIAN_DEFAULTS = {**_BART_DEFAULTS, 'pad_token_id': 58100}
_DECODER_TWINS = {
  'encoder_attention_heads': 'decoder_attention_heads',
  'encoder_ffn_dim': 'decoder_ffn_dim',
}


def _check_stacks(hf: dict) -> None:
  """One size for both stacks: our encoder and decoder layers share the config's heads and FFN width."""
  differ = [
    f'{e}={hf[e]} but {d}={hf[d]}'
    for e, d in _DECODER_TWINS.items()
    if e in hf and d in hf and hf[e] != hf[d]
  ]
  if differ:
    raise ConversionError(
      'the encoder and decoder must have the same sizes here: ' + ', '.join(differ)
    )
  # Dropout after the FFN activation is a training-time difference only; other values change the numbers.
  refuse(hf, normalize_before=(False,), add_final_layer_norm=(False,), normalize_embedding=(True,))


def _common_from_hf(hf: dict) -> dict:
  _check_stacks(hf)
  # `architectures` is the one the weights carry (see `load`): BartModel has no final_logits_bias
  bias = 'BartModel' not in (hf.get('architectures') or [])
  tied = hf.get('tie_word_embeddings', True)
  return dict(
    max_len=hf.get('max_position_embeddings', 1024),
    activation=activation(hf.get('activation_function', 'gelu')),
    init_std=hf.get('init_std', 0.02),
    num_decoder_layers=hf.get('decoder_layers', 12),
    norm_eps=1e-5,  # nn.LayerNorm's default, which both use
    tie_output=tied,
    output_bias=bias,
    pre_norm=False,
    final_norm=False,
    freeze_pad_embedding=True,
    decoder_start_id=hf.get('decoder_start_token_id'),
  )


def _common_to_hf(config: TransformerConfig) -> dict:
  # Marian starts decoding from its padding token, BART from its end token
  start = config.pad_id if config.decoder_start_id is None else config.decoder_start_id
  return dict(
    decoder_start_token_id=start,
    decoder_attention_heads=config.num_heads,
    decoder_ffn_dim=config.d_ff,
    activation_function=HF_ACTIVATIONS[config.activation],
    max_position_embeddings=config.max_len,
    init_std=config.init_std or 0.02,
    tie_word_embeddings=config.tie_output,
    is_encoder_decoder=True,
    decoder_layers=config.decoder_layers,
  )


def _check_common(config: TransformerConfig, what: str, **allowed) -> None:
  require(
    config,
    what,
    pre_norm=(False,),
    final_norm=(False,),
    norm_variant=('standard',),
    norm_eps=(1e-5,),
    qkv_bias=(True,),
    activation=tuple(HF_ACTIVATIONS),
    **{**CLASSIC_BLOCKS, **allowed},
  )


def _layers(config: TransformerConfig, p: str) -> list[Rule]:
  """The encoder and decoder layers under the prefix ``p`` (``'model.'`` with a head)."""

  def attention(ours: str, theirs: str) -> list[Rule]:
    sources = [tuple((f'{theirs}.{n}_proj.{leaf}',) for n in 'qkv') for leaf in ('weight', 'bias')]
    fused = config.fused_qkv and ours.endswith('self_attention')
    rules = qkv(ours, *sources, fused=fused)
    return rules + dense(f'{ours}/out', f'{theirs}.out_proj', n_in=2)

  rules = []
  for stack, count in (('encoder', config.num_layers), ('decoder', config.decoder_layers)):
    for i in range(count):
      ours, h = f'{stack}/layers_{i}', f'{p}{stack}.layers.{i}.'
      rules += attention(f'{ours}/self_attention', f'{h}self_attn')
      rules += norm(f'{ours}/self_attention_norm', f'{h}self_attn_layer_norm')
      if stack == 'decoder':
        rules += attention(f'{ours}/cross_attention', f'{h}encoder_attn')
        rules += norm(f'{ours}/cross_attention_norm', f'{h}encoder_attn_layer_norm')
      rules += dense(f'{ours}/ffn/fc_in', f'{h}fc1') + dense(f'{ours}/ffn/fc_out', f'{h}fc2')
      rules += norm(f'{ours}/ffn_norm', f'{h}final_layer_norm')
  return rules


def _embeddings_and_head(config: TransformerConfig, p: str, head: bool) -> Mapping:
  """Token tables, the tied copies ``transformers`` keeps of them, and the head; shared by both specs."""
  source, target = f'{p}encoder.embed_tokens.weight', f'{p}decoder.embed_tokens.weight'
  if config.share_embeddings:
    rules = [table('source_embed', f'{p}shared.weight')]
    aliases = {source: f'{p}shared.weight', target: f'{p}shared.weight'}
  else:
    rules = [table('source_embed', source), table('target_embed', target)]
    aliases = {}
  if head and config.tie_output:
    aliases['lm_head.weight'] = rules[-1].torch[0]
  elif head:
    rules += dense('output', 'lm_head', bias=False)
  if config.output_bias:
    # (1, V) in transformers: our (V,) vector seen as a (V, 1) matrix, transposed
    name = 'output_bias' if config.tie_output else 'output/bias'
    rules.append(Rule(name, ('final_logits_bias',), n_in=1, transpose=True))
  return Mapping(tuple(rules), aliases)


# ----------------------------------------------------------------------------------------------------------------------
# BART


def _bart_from_hf(hf: dict) -> dict:
  return dict(
    **_common_from_hf(hf),
    tgt_vocab_size=hf['vocab_size'],
    share_embeddings=True,
    position_encoding='learned',
    position_offset=2,
    embed_norm=True,
  )


def _bart_to_hf(config: TransformerConfig, architecture: str) -> dict:
  return _common_to_hf(config)


def check_bart(config: TransformerConfig) -> None:
  """Raises :class:`ConversionError` for a model BART cannot express."""
  _check_common(
    config,
    'BART',
    share_embeddings=(True,),
    position_encoding=('learned',),
    position_offset=(2,),
    embed_norm=(True,),
  )


def _bart_mapping(config: TransformerConfig, architecture: str) -> Mapping:
  head = architecture == 'BartForConditionalGeneration'
  p = 'model.' if head else ''
  if not head and (config.output_bias or not config.tie_output):
    raise ConversionError('BartModel has no head: it holds no final_logits_bias or lm_head')
  outer = _embeddings_and_head(config, p, head)
  rules = [*outer.rules]
  for ours, stack in (('source', 'encoder'), ('target', 'decoder')):
    rules.append(table(f'{ours}_positions', f'{p}{stack}.embed_positions.weight'))
    rules += norm(f'{ours}_embed_norm', f'{p}{stack}.layernorm_embedding')
  return Mapping(tuple(rules + _layers(config, p)), outer.aliases)


BART = Spec(
  model_type='bart',
  architectures={'BartForConditionalGeneration': Transformer, 'BartModel': Transformer},
  config_class=TransformerConfig,
  fields=_FIELDS,
  hf_defaults=_BART_DEFAULTS,
  more_from_hf=_bart_from_hf,
  more_to_hf=_bart_to_hf,
  check=check_bart,
  mapping=_bart_mapping,
  # the base model's names carry no 'model.' prefix
  architecture_of_state=lambda state: (
    'BartForConditionalGeneration' if any(k.startswith('model.') for k in state) else 'BartModel'
  ),
  describes=lambda config: config.position_encoding == 'learned' and config.embed_norm,
  # a tied head without a bias is the shared table alone: the base model holds all of it
  architecture_for=lambda config: (
    'BartModel' if config.tie_output and not config.output_bias else 'BartForConditionalGeneration'
  ),
)


# ----------------------------------------------------------------------------------------------------------------------
# Marian


def _marian_from_hf(hf: dict) -> dict:
  shared = hf.get('share_encoder_decoder_embeddings', True)
  return dict(
    **_common_from_hf(hf),
    tgt_vocab_size=hf['vocab_size'] if shared else hf.get('decoder_vocab_size') or hf['vocab_size'],
    share_embeddings=shared,
    position_encoding='sinusoidal_concat',
  )


def _marian_to_hf(config: TransformerConfig, architecture: str) -> dict:
  return dict(
    **_common_to_hf(config),
    decoder_vocab_size=config.tgt_vocab_size,
    share_encoder_decoder_embeddings=config.share_embeddings,
  )


def check_marian(config: TransformerConfig) -> None:
  """Raises :class:`ConversionError` for a model Marian cannot express."""
  _check_common(
    config,
    'Marian',
    position_encoding=('sinusoidal_concat',),
    output_bias=(True,),
  )


def _marian_mapping(config: TransformerConfig, architecture: str) -> Mapping:
  outer = _embeddings_and_head(config, 'model.', head=True)
  # the sinusoid tables are recomputed on load (transformers neither saves nor reads them)
  buffers = (r'model\.(encoder|decoder)\.embed_positions\.weight',)
  return Mapping(outer.rules + tuple(_layers(config, 'model.')), outer.aliases, buffers)


MARIAN = Spec(
  model_type='marian',
  architectures={'MarianMTModel': Transformer},
  config_class=TransformerConfig,
  fields=_FIELDS,
  hf_defaults=_MARIAN_DEFAULTS,
  more_from_hf=_marian_from_hf,
  more_to_hf=_marian_to_hf,
  check=check_marian,
  mapping=_marian_mapping,
  architecture_of_state=lambda state: 'MarianMTModel',
  describes=lambda config: config.position_encoding == 'sinusoidal_concat',
)


def from_bart(model_or_state, config=None, *, dtype=None) -> tuple[Transformer, dict]:
  """``BartForConditionalGeneration``/``BartModel`` (or a state dict plus its config) -> ``(Transformer, params)``.
  ``dtype``: the params' dtype (default: the checkpoint's)."""
  return load(BART, model_or_state, config, dtype=dtype)


def to_bart(model: Transformer, params: dict, *, head: bool = True, as_torch: bool = False) -> dict:
  """Our params -> a ``BartForConditionalGeneration`` (``head``) or ``BartModel`` state dict."""
  architecture = 'BartForConditionalGeneration' if head else 'BartModel'
  return export(BART, model, params, architecture, as_torch)


def from_marian(model_or_state, config=None, *, dtype=None) -> tuple[Transformer, dict]:
  """``MarianMTModel`` (or a state dict plus its config) -> ``(Transformer, params)``."""
  return load(MARIAN, model_or_state, config, dtype=dtype)


def to_marian(model: Transformer, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> a ``MarianMTModel`` state dict (numpy, or torch tensors)."""
  return export(MARIAN, model, params, 'MarianMTModel', as_torch)
