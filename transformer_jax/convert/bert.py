"""The BERT spec: Hugging Face's ``BertModel``, ``BertForMaskedLM`` and ``BertForSequenceClassification`` <-> our
:class:`~transformer_jax.BERT` and its heads."""

from __future__ import annotations

from transformer_jax.convert.hf_options import HF_ACTIVATIONS, activation, refuse
from transformer_jax.convert.rules import (
  CLASSIC_BLOCKS,
  Mapping,
  Rule,
  dense,
  norm,
  qkv,
  require,
  table,
)
from transformer_jax.convert.spec import Spec, export, load
from transformer_jax.models import BERT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification

BERT_CLASSES = {
  'BertModel': BERT,
  'BertForMaskedLM': BERTForMaskedLM,
  'BertForSequenceClassification': BERTForSequenceClassification,
}


# Our field -> the BertConfig key, and BertConfig's defaults for the keys a config.json may omit.
_FIELDS = {
  'vocab_size': 'vocab_size',
  'type_vocab_size': 'type_vocab_size',
  'max_len': 'max_position_embeddings',
  'num_layers': 'num_hidden_layers',
  'd_model': 'hidden_size',
  'num_heads': 'num_attention_heads',
  'd_ff': 'intermediate_size',
  'norm_eps': 'layer_norm_eps',
  'dropout_rate': 'hidden_dropout_prob',
  'attention_dropout_rate': 'attention_probs_dropout_prob',
  'pad_id': 'pad_token_id',
  'classifier_dropout_rate': 'classifier_dropout',
}
_HF_DEFAULTS = {
  'type_vocab_size': 2,
  'layer_norm_eps': 1e-12,
  'hidden_dropout_prob': 0.1,
  'attention_probs_dropout_prob': 0.1,
  'pad_token_id': 0,
  'classifier_dropout': None,
}


def _more_from_hf(hf: dict) -> dict:
  refuse(
    hf, position_embedding_type=('absolute',), is_decoder=(False,), add_cross_attention=(False,)
  )
  return dict(
    activation=activation(hf.get('hidden_act', 'gelu')),
    init_std=hf.get('initializer_range', 0.02),
    num_labels=hf.get('num_labels') or len(hf.get('id2label') or {}) or 2,
  )


def _more_to_hf(config: BERTConfig, architecture: str) -> dict:
  return dict(
    hidden_act=HF_ACTIVATIONS[config.activation],
    initializer_range=config.init_std or 0.02,
    id2label={str(i): f'LABEL_{i}' for i in range(config.num_labels)},
    tie_word_embeddings=True,
  )


def check_bert(config: BERTConfig) -> None:
  """Raises :class:`ConversionError` for a model BERT cannot express."""
  require(
    config,
    'BERT',
    pre_norm=(False,),
    qkv_bias=(True,),
    final_norm=(False,),
    norm_variant=('standard',),
    activation=tuple(HF_ACTIVATIONS),
    **CLASSIC_BLOCKS,
  )


def bert_mapping(config: BERTConfig, architecture: str) -> Mapping:
  """HF BERT names -> ours for ``architecture``: the encoder (``bert.`` prefixed under a head) and its head."""
  base = architecture == 'BertModel'
  p, o = ('', '') if base else ('bert.', 'bert/')
  e = f'{p}embeddings.'
  rules = [
    table(f'{o}token_embed', f'{e}word_embeddings.weight'),
    table(f'{o}positions', f'{e}position_embeddings.weight'),
    table(f'{o}token_type_embed', f'{e}token_type_embeddings.weight'),
    *norm(f'{o}embed_norm', f'{e}LayerNorm'),
  ]
  for i in range(config.num_layers):
    ours, h = f'{o}encoder/layers_{i}', f'{p}encoder.layer.{i}.'
    sources = [
      tuple((f'{h}attention.self.{n}.{leaf}',) for n in ('query', 'key', 'value'))
      for leaf in ('weight', 'bias')
    ]
    rules += qkv(f'{ours}/self_attention', *sources, fused=config.fused_qkv)
    rules += dense(f'{ours}/self_attention/out', f'{h}attention.output.dense', n_in=2)
    rules += norm(f'{ours}/self_attention_norm', f'{h}attention.output.LayerNorm')
    rules += dense(f'{ours}/ffn/fc_in', f'{h}intermediate.dense') + dense(
      f'{ours}/ffn/fc_out', f'{h}output.dense'
    )
    rules += norm(f'{ours}/ffn_norm', f'{h}output.LayerNorm')
  aliases = {}
  if architecture == 'BertForMaskedLM':
    rules += dense('mlm_dense', 'cls.predictions.transform.dense') + norm(
      'mlm_norm', 'cls.predictions.transform.LayerNorm'
    )
    rules.append(Rule('mlm_bias', ('cls.predictions.bias',), 0))
    aliases = {
      'cls.predictions.decoder.weight': f'{e}word_embeddings.weight',
      'cls.predictions.decoder.bias': 'cls.predictions.bias',
    }
  else:
    rules += dense(f'{o}pooler', f'{p}pooler.dense')
  if architecture == 'BertForSequenceClassification':
    rules += dense('classifier', 'classifier')
  return Mapping(
    tuple(rules), aliases, buffers=(r'(bert\.)?embeddings\.(position_ids|token_type_ids)',)
  )


def bert_architecture(state: dict) -> str:
  """Which HF BERT class a state dict belongs to, from its head weights."""
  if 'classifier.weight' in state:
    return 'BertForSequenceClassification'
  if any(k.startswith('cls.predictions.') for k in state):
    return 'BertForMaskedLM'
  return 'BertModel'


BERT_SPEC = Spec(
  model_type='bert',
  architectures=BERT_CLASSES,
  config_class=BERTConfig,
  fields=_FIELDS,
  hf_defaults=_HF_DEFAULTS,
  more_from_hf=_more_from_hf,
  more_to_hf=_more_to_hf,
  check=check_bert,
  mapping=bert_mapping,
  architecture_of_state=bert_architecture,
)


def bert_hf_config(config: BERTConfig, architecture: str) -> dict:
  """:class:`BERTConfig` -> a ``config.json`` dict for ``architecture`` (a key of :data:`BERT_CLASSES`)."""
  return BERT_SPEC.hf_config(config, architecture)


def from_bert(model_or_state, config=None, *, dtype=None) -> tuple:
  """``BertModel``/``BertForMaskedLM``/``BertForSequenceClassification`` (or a state dict plus its config) ->
  ``(BERT | BERTForMaskedLM | BERTForSequenceClassification, params)``; the head is read off the weights."""
  return load(BERT_SPEC, model_or_state, config, dtype=dtype)


def to_bert(model, params: dict, *, as_torch: bool = False) -> dict:
  """Our BERT / BERTForMaskedLM / BERTForSequenceClassification params -> the matching HF state dict."""
  return export(BERT_SPEC, model, params, as_torch=as_torch)
