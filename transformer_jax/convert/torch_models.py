"""``torch.nn.Transformer`` and the PyTorch reference models (:mod:`transformer_jax.torch_reference`) <-> ours.

Hyperparameters are read off the modules themselves, so the course's own seed-notebook models (same names) load too.
"""

from __future__ import annotations

from transformer_jax.convert.common import export_state, import_state, state_to_numpy, weight_dtype
from transformer_jax.convert.tables import ConversionError, Mapping, dense, norm, qkv, require, table
from transformer_jax.models import GPT, GPTConfig, Transformer, TransformerConfig

TORCH_POSITION_ENCODINGS = ('sinusoidal', 'sinusoidal_concat', 'none')  # the ones with no weights to bring

# ------------------------------------------------------------------------------------------ torch.nn.Transformer


def _torch_activation(layer) -> str:
  # torch records a string activation as 1 (relu) or 2 (gelu); a custom callable leaves 0.
  kind = getattr(layer, 'activation_relu_or_gelu', 0)
  if kind not in (1, 2):
    raise ConversionError(f'unsupported nn.Transformer activation {layer.activation!r}; use "relu" or "gelu"')
  return 'relu' if kind == 1 else 'gelu'


def torch_transformer_config(transformer, source_embed, target_embed, *, position_encoding: str = 'sinusoidal',
                             scale_embeddings: bool = True, max_len: int = 512, pad_id: int | None = 0,
                             dtype: str = 'float32') -> TransformerConfig:
  """The :class:`TransformerConfig` of an ``nn.Transformer`` with its embeddings (options as in
  :func:`from_torch_transformer`)."""
  if position_encoding not in TORCH_POSITION_ENCODINGS:
    raise ConversionError(f'position_encoding must be one of {TORCH_POSITION_ENCODINGS} (no weights to convert), '
                          f'got {position_encoding!r}')
  enc = transformer.encoder.layers[0]
  return TransformerConfig(
      src_vocab_size=source_embed.num_embeddings, tgt_vocab_size=target_embed.num_embeddings,
      d_model=transformer.d_model, num_heads=transformer.nhead, d_ff=enc.linear1.out_features,
      num_layers=len(transformer.encoder.layers), num_decoder_layers=len(transformer.decoder.layers), max_len=max_len,
      dropout_rate=enc.dropout.p, attention_dropout_rate=enc.self_attn.dropout, activation=_torch_activation(enc),
      norm_eps=enc.norm1.eps, pre_norm=enc.norm_first, final_norm=True, pad_id=pad_id,
      scale_embeddings=scale_embeddings, position_encoding=position_encoding, dtype=dtype, param_dtype=dtype)


def torch_transformer_mapping(config: TransformerConfig) -> Mapping:
  """Names of ``nn.ModuleDict(transformer=, source_embed=, target_embed=, output=)`` -> ours. Q/K/V are packed in
  ``in_proj_weight`` ``(3D, D)``."""
  require(config, 'nn.Transformer', share_embeddings=(False,), tie_output=(False,), final_norm=(True,),
          norm_variant=('standard',), qkv_bias=(True,), activation=('relu', 'gelu'),
          position_encoding=TORCH_POSITION_ENCODINGS)
  rules = [table('source_embed', 'source_embed.weight'), table('target_embed', 'target_embed.weight')]

  def attention(ours, torch_name, fused):
    return (qkv(ours, f'{torch_name}.in_proj_weight', f'{torch_name}.in_proj_bias', fused=fused)
            + dense(f'{ours}/out', f'{torch_name}.out_proj', n_in=2))

  for stack, count, sublayers in (('encoder', config.num_layers, ('self_attention', 'ffn')),
                                  ('decoder', config.decoder_layers, ('self_attention', 'cross_attention', 'ffn'))):
    for i in range(count):
      ours, t = f'{stack}/layers_{i}', f'transformer.{stack}.layers.{i}.'
      rules += attention(f'{ours}/self_attention', f'{t}self_attn', config.fused_qkv)
      if stack == 'decoder':
        rules += attention(f'{ours}/cross_attention', f'{t}multihead_attn', False)
      rules += dense(f'{ours}/ffn/fc_in', f'{t}linear1') + dense(f'{ours}/ffn/fc_out', f'{t}linear2')
      for n, sublayer in enumerate(sublayers, start=1):  # norm1, norm2(, norm3) follow the sublayer order
        rules += norm(f'{ours}/{sublayer}_norm', f'{t}norm{n}')
    rules += norm(f'{stack}/final_norm', f'transformer.{stack}.norm')
  return Mapping(tuple(rules + dense('output', 'output')))


def from_torch_transformer(transformer, source_embed, target_embed, output, *, position_encoding: str = 'sinusoidal',
                           scale_embeddings: bool = True, max_len: int = 512, pad_id: int | None = 0,
                           dtype=None) -> tuple[Transformer, dict]:
  """An ``nn.Transformer`` plus the source/target ``nn.Embedding`` and output ``nn.Linear`` around it ->
  ``(Transformer, params)``.

  The torch side this matches: ``x = embed(ids) * sqrt(D)`` (``scale_embeddings``) ``+ PE`` (``position_encoding``:
  ``'sinusoidal'`` interleaved, ``'sinusoidal_concat'`` or ``'none'``), then the ``nn.Transformer`` (either
  ``norm_first`` and ``batch_first``: weights are the same), then ``output``. ``pad_id``: the padding id our model
  derives masks from when none are passed (``None``: no padding).
  """
  import torch  # the caller handed us torch modules

  bundle = torch.nn.ModuleDict(dict(transformer=transformer, source_embed=source_embed, target_embed=target_embed,
                                    output=output))
  state = state_to_numpy(bundle)
  dtype = weight_dtype(state, dtype)
  config = torch_transformer_config(transformer, source_embed, target_embed, position_encoding=position_encoding,
                                    scale_embeddings=scale_embeddings, max_len=max_len, pad_id=pad_id, dtype=dtype)
  model = Transformer(config)
  return model, import_state(state, model, torch_transformer_mapping(config), dtype)


def to_torch_transformer(model: Transformer, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> the state dict of ``nn.ModuleDict(transformer=, source_embed=, target_embed=, output=)``."""
  return export_state(model, params, torch_transformer_mapping(model.config), as_torch)


# ------------------------------------------------------------------------------- reference encoder-decoder (002)


def _require_course(config, course, what: str, fields: tuple[str, ...]) -> None:
  """The reference models have one architecture, the course preset's: these ``fields`` must keep its values."""
  require(config, what, **{field: (getattr(course, field),) for field in fields})



def reference_transformer_mapping(config: TransformerConfig) -> Mapping:
  """Names of :class:`~transformer_jax.torch_reference.Seq2SeqTransformer` (the seed 002 names) -> ours."""
  _require_course(config, TransformerConfig.course(), 'the seed 002 encoder-decoder',
                  ('norm_variant', 'pre_norm', 'final_norm', 'activation', 'qkv_bias', 'share_embeddings',
                   'tie_output', 'position_encoding', 'scale_embeddings'))
  rules = [table('source_embed', 'encoder.embedding.weight'), table('target_embed', 'decoder.embedding.weight')]

  def attention(ours, t, fused):
    sources = [tuple((f'{t}.W_{n}.{leaf}',) for n in 'qkv') for leaf in ('weight', 'bias')]
    return qkv(ours, *sources, fused=fused) + dense(f'{ours}/out', f'{t}.W_o', n_in=2)

  for stack, count, attentions in (('encoder', config.num_layers, (('self_attention', 'mha'),)),
                                   ('decoder', config.decoder_layers,
                                    (('self_attention', 'mha1'), ('cross_attention', 'mha2')))):
    for i in range(count):
      ours, t = f'{stack}/layers_{i}', f'{stack}.{stack}_layers.{i}.'
      for n, (sublayer, name) in enumerate(attentions, start=1):
        rules += attention(f'{ours}/{sublayer}', t + name, config.fused_qkv and sublayer == 'self_attention')
        rules += norm(f'{ours}/{sublayer}_norm', f'{t}layernorm{n}', 'gamma', 'beta')
      rules += dense(f'{ours}/ffn/fc_in', f'{t}ffn.fc1') + dense(f'{ours}/ffn/fc_out', f'{t}ffn.fc2')
      rules += norm(f'{ours}/ffn_norm', f'{t}layernorm{len(attentions) + 1}', 'gamma', 'beta')
  # the seed registers its sinusoid table as a (persistent) buffer
  return Mapping(tuple(rules + dense('output', 'final_layer')), buffers=(r'(en|de)coder\.pos_encoding\.pe',))


def from_reference_transformer(reference, *, dtype=None) -> tuple[Transformer, dict]:
  """:class:`~transformer_jax.torch_reference.Seq2SeqTransformer` (or the seed notebook's ``Transformer``) ->
  ``(Transformer, params)`` with ``TransformerConfig.course`` settings."""
  state = state_to_numpy(reference)
  dtype = weight_dtype(state, dtype)
  enc, dec = reference.encoder, reference.decoder
  layer = enc.encoder_layers[0]
  config = TransformerConfig.course(
      src_vocab_size=enc.embedding.num_embeddings, tgt_vocab_size=dec.embedding.num_embeddings,
      d_model=enc.d_model, num_heads=layer.mha.num_heads, d_ff=layer.ffn.fc1.out_features,
      num_layers=len(enc.encoder_layers), num_decoder_layers=len(dec.decoder_layers),
      max_len=enc.pos_encoding.pe.shape[1], norm_eps=layer.layernorm1.eps, dropout_rate=enc.dropout.p,
      attention_dropout_rate=0.0, pad_id=getattr(reference, 'pad_id', 0), dtype=dtype, param_dtype=dtype)
  model = Transformer(config)
  return model, import_state(state, model, reference_transformer_mapping(config), dtype)


def to_reference_transformer(model: Transformer, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> a :class:`~transformer_jax.torch_reference.Seq2SeqTransformer` state dict."""
  return export_state(model, params, reference_transformer_mapping(model.config), as_torch)


# --------------------------------------------------------------------------------------- reference nanoGPT (004)


def reference_gpt_mapping(config: GPTConfig) -> Mapping:
  """Names of :class:`~transformer_jax.torch_reference.NanoGPT` -> ours. Each head has its own ``(K, D)`` key/query/
  value weight; concatenated over heads they are our ``(D, H, K)`` kernels."""
  _require_course(config, GPTConfig.course(), 'the seed 004 nanoGPT',
                  ('norm_variant', 'pre_norm', 'final_norm', 'activation', 'qkv_bias', 'tie_output', 'output_bias',
                   'position_encoding'))
  rules = [table('token_embed', 'token_embedding_table.weight'), table('positions', 'position_embedding_table.weight')]
  for i in range(config.num_layers):
    ours, t = f'decoder/layers_{i}', f'blocks.{i}.'
    heads = tuple(tuple(f'{t}sa.heads.{h}.{n}.weight' for h in range(config.num_heads))
                  for n in ('query', 'key', 'value'))
    rules += qkv(f'{ours}/self_attention', heads, None, fused=config.fused_qkv)
    rules += dense(f'{ours}/self_attention/out', f'{t}sa.proj', n_in=2)
    rules += dense(f'{ours}/ffn/fc_in', f'{t}ffwd.net.0') + dense(f'{ours}/ffn/fc_out', f'{t}ffwd.net.2')
    rules += norm(f'{ours}/self_attention_norm', f'{t}ln1') + norm(f'{ours}/ffn_norm', f'{t}ln2')
  return Mapping(tuple(rules + norm('decoder/final_norm', 'ln_f') + dense('output', 'lm_head')))


def from_reference_gpt(reference, *, dtype=None) -> tuple[GPT, dict]:
  """:class:`~transformer_jax.torch_reference.NanoGPT` -> ``(GPT, params)`` with ``GPTConfig.course`` settings."""
  state = state_to_numpy(reference)
  dtype = weight_dtype(state, dtype)
  block = reference.blocks[0]
  d_model = reference.token_embedding_table.embedding_dim
  config = GPTConfig.course(
      vocab_size=reference.token_embedding_table.num_embeddings,
      max_len=reference.position_embedding_table.num_embeddings, num_layers=len(reference.blocks),
      d_model=d_model, num_heads=len(block.sa.heads), d_ff=block.ffwd.net[0].out_features,
      norm_eps=block.ln1.eps, dropout_rate=reference.dropout.p, attention_dropout_rate=0.0, dtype=dtype,
      param_dtype=dtype)
  model = GPT(config)
  return model, import_state(state, model, reference_gpt_mapping(config), dtype)


def to_reference_gpt(model: GPT, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> a :class:`~transformer_jax.torch_reference.NanoGPT` state dict."""
  return export_state(model, params, reference_gpt_mapping(model.config), as_torch)
