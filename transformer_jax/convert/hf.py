"""Hugging Face GPT-2 and BERT (PyTorch classes of ``transformers``) <-> our GPT and BERT.

Configs travel as plain dicts (``config.json``, or ``hf_model.config.to_dict()``), so that nothing here needs
``transformers``; torch is imported only when a torch object is handed in or asked for.
"""

from __future__ import annotations

from transformer_jax.convert.common import export_state, import_state, state_to_numpy, weight_dtype
from transformer_jax.convert.tables import ConversionError, Mapping, Rule, dense, norm, qkv, require, table
from transformer_jax.models import BERT, GPT, BERTConfig, BERTForMaskedLM, BERTForSequenceClassification, GPTConfig

# Hugging Face activation names -> ours; 'gelu_new' is GPT-2's tanh approximation.
_ACTIVATIONS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu', 'relu': 'relu'}
_HF_ACTIVATIONS = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu'}

GPT2_ARCHITECTURES = ('GPT2LMHeadModel', 'GPT2Model')
BERT_CLASSES = {'BertModel': BERT, 'BertForMaskedLM': BERTForMaskedLM,
                'BertForSequenceClassification': BERTForSequenceClassification}


def _activation(name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ConversionError(f'unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def _refuse(hf: dict, **unsupported) -> None:
  """Raises for Hugging Face options whose value would change the numbers and that we do not implement."""
  bad = [f'{k}={hf[k]!r}' for k, ok in unsupported.items() if k in hf and hf[k] not in ok]
  if bad:
    raise ConversionError('unsupported Hugging Face config options: ' + ', '.join(bad))


# ----------------------------------------------------------------------------------------------------------- GPT-2


def gpt2_config(hf: dict, dtype: str = 'float32') -> GPTConfig:
  """A ``GPT2Config`` dict -> :class:`GPTConfig` (fused Q/K/V, tied head, like the checkpoint)."""
  _refuse(hf, scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,), add_cross_attention=(False,))
  return GPTConfig(
      vocab_size=hf['vocab_size'], max_len=hf['n_positions'], num_layers=hf['n_layer'], d_model=hf['n_embd'],
      num_heads=hf['n_head'], d_ff=hf.get('n_inner') or 4 * hf['n_embd'],
      activation=_activation(hf.get('activation_function', 'gelu_new')), norm_eps=hf.get('layer_norm_epsilon', 1e-5),
      dropout_rate=hf.get('resid_pdrop', 0.1), attention_dropout_rate=hf.get('attn_pdrop', 0.1),
      init_std=hf.get('initializer_range', 0.02), dtype=dtype, param_dtype=dtype)


def gpt2_hf_config(config: GPTConfig, head: bool = True) -> dict:
  """:class:`GPTConfig` -> a ``config.json`` dict for ``GPT2LMHeadModel`` (``head``) or ``GPT2Model``."""
  gpt2_mapping(config, head)  # refuses configs GPT-2 cannot express
  return dict(model_type='gpt2', architectures=['GPT2LMHeadModel' if head else 'GPT2Model'],
              vocab_size=config.vocab_size, n_positions=config.max_len, n_layer=config.num_layers,
              n_embd=config.d_model, n_head=config.num_heads, n_inner=config.d_ff,
              activation_function=_HF_ACTIVATIONS[config.activation], layer_norm_epsilon=config.norm_eps,
              resid_pdrop=config.dropout_rate, embd_pdrop=config.dropout_rate,
              attn_pdrop=config.attention_dropout_rate, initializer_range=config.init_std or 0.02,
              tie_word_embeddings=True, dtype=config.param_dtype)


def gpt2_mapping(config: GPTConfig, head: bool = True) -> Mapping:
  """HF GPT-2 names (``transformer.`` prefixed with the LM head) -> ours. ``Conv1D`` stores ``[in, out]``."""
  require(config, 'GPT-2', pre_norm=(True,), final_norm=(True,), qkv_bias=(True,), tie_output=(True,),
          output_bias=(False,), position_encoding=('learned',), norm_variant=('standard',),
          activation=tuple(_HF_ACTIVATIONS))
  p = 'transformer.' if head else ''
  rules = [table('token_embed', f'{p}wte.weight'), table('positions', f'{p}wpe.weight')]
  for i in range(config.num_layers):
    ours, h = f'decoder/layers_{i}', f'{p}h.{i}.'
    rules += norm(f'{ours}/self_attention_norm', f'{h}ln_1') + norm(f'{ours}/ffn_norm', f'{h}ln_2')
    rules += qkv(f'{ours}/self_attention', f'{h}attn.c_attn.weight', f'{h}attn.c_attn.bias', fused=config.fused_qkv,
                 transpose=False)
    rules += dense(f'{ours}/self_attention/out', f'{h}attn.c_proj', n_in=2, transpose=False)
    rules += dense(f'{ours}/ffn/fc_in', f'{h}mlp.c_fc', transpose=False)
    rules += dense(f'{ours}/ffn/fc_out', f'{h}mlp.c_proj', transpose=False)
  rules += norm('decoder/final_norm', f'{p}ln_f')
  return Mapping(tuple(rules), aliases={'lm_head.weight': f'{p}wte.weight'} if head else {},
                 buffers=(r'.*\.attn\.(bias|masked_bias)',))  # causal-mask buffers of older checkpoints


def _hf_config_dict(model_or_config) -> dict:
  config = getattr(model_or_config, 'config', model_or_config)
  return config if isinstance(config, dict) else config.to_dict()


def _is_gpt2_head(state: dict) -> bool:
  return any(k.startswith('transformer.') for k in state)


def from_gpt2(model_or_state, config=None, *, dtype=None) -> tuple[GPT, dict]:
  """``GPT2LMHeadModel``/``GPT2Model`` (or a state dict plus its config, a ``GPT2Config`` or dict) -> ``(GPT,
  params)``. ``dtype``: the params' dtype (default: the checkpoint's)."""
  state = state_to_numpy(model_or_state)
  dtype = weight_dtype(state, dtype)
  ours = GPT(gpt2_config(_hf_config_dict(model_or_state if config is None else config), dtype))
  return ours, import_state(state, ours, gpt2_mapping(ours.config, _is_gpt2_head(state)), dtype)


def to_gpt2(model: GPT, params: dict, *, head: bool = True, as_torch: bool = False) -> dict:
  """Our GPT params -> a ``GPT2LMHeadModel`` (``head``) or ``GPT2Model`` state dict (numpy, or torch tensors)."""
  return export_state(model, params, gpt2_mapping(model.config, head), as_torch)


# ------------------------------------------------------------------------------------------------------------ BERT


def bert_config(hf: dict, dtype: str = 'float32') -> BERTConfig:
  """A ``BertConfig`` dict -> :class:`BERTConfig`."""
  _refuse(hf, position_embedding_type=('absolute',), is_decoder=(False,), add_cross_attention=(False,))
  num_labels = hf.get('num_labels') or len(hf.get('id2label') or {}) or 2
  return BERTConfig(
      vocab_size=hf['vocab_size'], type_vocab_size=hf.get('type_vocab_size', 2),
      max_len=hf['max_position_embeddings'], num_layers=hf['num_hidden_layers'], d_model=hf['hidden_size'],
      num_heads=hf['num_attention_heads'], d_ff=hf['intermediate_size'],
      activation=_activation(hf.get('hidden_act', 'gelu')), norm_eps=hf.get('layer_norm_eps', 1e-12),
      dropout_rate=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=hf.get('attention_probs_dropout_prob', 0.1),
      init_std=hf.get('initializer_range', 0.02), pad_id=hf.get('pad_token_id', 0), num_labels=num_labels,
      classifier_dropout_rate=hf.get('classifier_dropout'), dtype=dtype, param_dtype=dtype)


def bert_hf_config(config: BERTConfig, architecture: str) -> dict:
  """:class:`BERTConfig` -> a ``config.json`` dict for ``architecture`` (a key of :data:`BERT_CLASSES`)."""
  bert_mapping(config, architecture)  # refuses configs BERT cannot express
  return dict(model_type='bert', architectures=[architecture], vocab_size=config.vocab_size,
              type_vocab_size=config.type_vocab_size, max_position_embeddings=config.max_len,
              num_hidden_layers=config.num_layers, hidden_size=config.d_model,
              num_attention_heads=config.num_heads, intermediate_size=config.d_ff,
              hidden_act=_HF_ACTIVATIONS[config.activation], layer_norm_eps=config.norm_eps,
              hidden_dropout_prob=config.dropout_rate, attention_probs_dropout_prob=config.attention_dropout_rate,
              initializer_range=config.init_std or 0.02, pad_token_id=config.pad_id,
              classifier_dropout=config.classifier_dropout_rate,
              id2label={str(i): f'LABEL_{i}' for i in range(config.num_labels)}, tie_word_embeddings=True,
              dtype=config.param_dtype)


def bert_mapping(config: BERTConfig, architecture: str) -> Mapping:
  """HF BERT names -> ours for ``architecture``: the encoder (``bert.`` prefixed under a head) and its head."""
  require(config, 'BERT', pre_norm=(False,), qkv_bias=(True,), final_norm=(False,), norm_variant=('standard',),
          activation=tuple(_HF_ACTIVATIONS))
  base = architecture == 'BertModel'
  p, o = ('', '') if base else ('bert.', 'bert/')
  e = f'{p}embeddings.'
  rules = [table(f'{o}token_embed', f'{e}word_embeddings.weight'), table(f'{o}positions', f'{e}position_embeddings.weight'),
           table(f'{o}token_type_embed', f'{e}token_type_embeddings.weight'), *norm(f'{o}embed_norm', f'{e}LayerNorm')]
  for i in range(config.num_layers):
    ours, h = f'{o}encoder/layers_{i}', f'{p}encoder.layer.{i}.'
    sources = [tuple((f'{h}attention.self.{n}.{leaf}',) for n in ('query', 'key', 'value')) for leaf in ('weight', 'bias')]
    rules += qkv(f'{ours}/self_attention', *sources, fused=config.fused_qkv)
    rules += dense(f'{ours}/self_attention/out', f'{h}attention.output.dense', n_in=2)
    rules += norm(f'{ours}/self_attention_norm', f'{h}attention.output.LayerNorm')
    rules += dense(f'{ours}/ffn/fc_in', f'{h}intermediate.dense') + dense(f'{ours}/ffn/fc_out', f'{h}output.dense')
    rules += norm(f'{ours}/ffn_norm', f'{h}output.LayerNorm')
  aliases = {}
  if architecture == 'BertForMaskedLM':
    rules += dense('mlm_dense', 'cls.predictions.transform.dense') + norm('mlm_norm', 'cls.predictions.transform.LayerNorm')
    rules.append(Rule('mlm_bias', ('cls.predictions.bias',), 0))
    aliases = {'cls.predictions.decoder.weight': f'{e}word_embeddings.weight',
               'cls.predictions.decoder.bias': 'cls.predictions.bias'}
  else:
    rules += dense(f'{o}pooler', f'{p}pooler.dense')
  if architecture == 'BertForSequenceClassification':
    rules += dense('classifier', 'classifier')
  return Mapping(tuple(rules), aliases, buffers=(r'(bert\.)?embeddings\.(position_ids|token_type_ids)',))


def bert_architecture(state: dict) -> str:
  """Which HF BERT class a state dict belongs to, from its head weights."""
  if 'classifier.weight' in state:
    return 'BertForSequenceClassification'
  if any(k.startswith('cls.predictions.') for k in state):
    return 'BertForMaskedLM'
  return 'BertModel'


def from_bert(model_or_state, config=None, *, dtype=None) -> tuple:
  """``BertModel``/``BertForMaskedLM``/``BertForSequenceClassification`` (or a state dict plus its config) ->
  ``(BERT | BERTForMaskedLM | BERTForSequenceClassification, params)``; the head is read off the weights."""
  state = state_to_numpy(model_or_state)
  dtype = weight_dtype(state, dtype)
  architecture = bert_architecture(state)
  cfg = bert_config(_hf_config_dict(model_or_state if config is None else config), dtype)
  ours = BERT_CLASSES[architecture](cfg)
  return ours, import_state(state, ours, bert_mapping(cfg, architecture), dtype)


def our_bert_architecture(model) -> str:
  return {cls: name for name, cls in BERT_CLASSES.items()}[type(model)]


def to_bert(model, params: dict, *, as_torch: bool = False) -> dict:
  """Our BERT / BERTForMaskedLM / BERTForSequenceClassification params -> the matching HF state dict."""
  return export_state(model, params, bert_mapping(model.config, our_bert_architecture(model)), as_torch)


