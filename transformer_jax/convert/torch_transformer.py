"""``torch.nn.Transformer`` with its embeddings and output layer <-> our :class:`~transformer_jax.Transformer`.

Hyperparameters are read off the modules themselves.
"""

from __future__ import annotations

from transformer_jax.convert.engine import export_state
from transformer_jax.convert.rules import (
  CLASSIC_BLOCKS,
  ConversionError,
  Mapping,
  dense,
  norm,
  qkv,
  require,
  table,
)
from transformer_jax.convert.spec import convert_in
from transformer_jax.models import Transformer, TransformerConfig

# the ones with no weights to bring
TORCH_POSITION_ENCODINGS = (
  'sinusoidal',
  'sinusoidal_concat',
  'none',
)


def _torch_activation(layer) -> str:
  # torch records a string activation as 1 (relu) or 2 (gelu); a custom callable leaves 0.
  kind = getattr(layer, 'activation_relu_or_gelu', 0)
  if kind not in (1, 2):
    raise ConversionError(
      f'unsupported nn.Transformer activation {layer.activation!r}; use "relu" or "gelu"'
    )
  return 'relu' if kind == 1 else 'gelu'


def torch_transformer_config(
  transformer,
  source_embed,
  target_embed,
  *,
  position_encoding: str = 'sinusoidal',
  scale_embeddings: bool = True,
  max_len: int = 512,
  pad_id: int | None = 0,
  dtype: str = 'float32',
) -> TransformerConfig:
  """The :class:`TransformerConfig` of an ``nn.Transformer`` with its embeddings (options as in
  :func:`from_torch_transformer`)."""
  if position_encoding not in TORCH_POSITION_ENCODINGS:
    raise ConversionError(
      f'position_encoding must be one of {TORCH_POSITION_ENCODINGS} (no weights to convert), '
      f'got {position_encoding!r}'
    )
  enc = transformer.encoder.layers[0]
  return TransformerConfig(
    src_vocab_size=source_embed.num_embeddings,
    tgt_vocab_size=target_embed.num_embeddings,
    d_model=transformer.d_model,
    num_heads=transformer.nhead,
    d_ff=enc.linear1.out_features,
    num_layers=len(transformer.encoder.layers),
    num_decoder_layers=len(transformer.decoder.layers),
    max_len=max_len,
    dropout_rate=enc.dropout.p,
    attention_dropout_rate=enc.self_attn.dropout,
    activation=_torch_activation(enc),
    norm_eps=enc.norm1.eps,
    pre_norm=enc.norm_first,
    final_norm=True,
    pad_id=pad_id,
    scale_embeddings=scale_embeddings,
    position_encoding=position_encoding,
    dtype=dtype,
    param_dtype=dtype,
  )


def torch_transformer_mapping(config: TransformerConfig) -> Mapping:
  """Names of ``nn.ModuleDict(transformer=, source_embed=, target_embed=, output=)`` -> ours. Q/K/V are packed in
  ``in_proj_weight`` ``(3D, D)``."""
  require(
    config,
    'nn.Transformer',
    share_embeddings=(False,),
    tie_output=(False,),
    final_norm=(True,),
    norm_variant=('standard',),
    qkv_bias=(True,),
    activation=('relu', 'gelu'),
    position_encoding=TORCH_POSITION_ENCODINGS,
    scale_decoder_output=(False,),
    **CLASSIC_BLOCKS,
  )
  rules = [
    table('source_embed', 'source_embed.weight'),
    table('target_embed', 'target_embed.weight'),
  ]

  def attention(ours, torch_name, fused):
    return qkv(
      ours, f'{torch_name}.in_proj_weight', f'{torch_name}.in_proj_bias', fused=fused
    ) + dense(f'{ours}/out', f'{torch_name}.out_proj', n_in=2)

  for stack, count, sublayers in (
    ('encoder', config.num_layers, ('self_attention', 'ffn')),
    ('decoder', config.decoder_layers, ('self_attention', 'cross_attention', 'ffn')),
  ):
    for i in range(count):
      ours, t = f'{stack}/layers_{i}', f'transformer.{stack}.layers.{i}.'
      rules += attention(f'{ours}/self_attention', f'{t}self_attn', config.fused_qkv)
      if stack == 'decoder':
        rules += attention(f'{ours}/cross_attention', f'{t}multihead_attn', False)
      rules += dense(f'{ours}/ffn/fc_in', f'{t}linear1') + dense(
        f'{ours}/ffn/fc_out', f'{t}linear2'
      )
      # norm1, norm2(, norm3) follow the sublayer order
      for n, sublayer in enumerate(sublayers, start=1):
        rules += norm(f'{ours}/{sublayer}_norm', f'{t}norm{n}')
    rules += norm(f'{stack}/final_norm', f'transformer.{stack}.norm')
  return Mapping(tuple(rules + dense('output', 'output')))


def from_torch_transformer(
  transformer, source_embed, target_embed, output, *, dtype=None, **options
) -> tuple[Transformer, dict]:
  """An ``nn.Transformer`` plus the source/target ``nn.Embedding`` and output ``nn.Linear`` around it ->
  ``(Transformer, params)``.

  The torch side this matches: ``x = embed(ids) * sqrt(D)`` (``scale_embeddings``) ``+ PE`` (``position_encoding``:
  ``'sinusoidal'`` interleaved, ``'sinusoidal_concat'`` or ``'none'``), then the ``nn.Transformer`` (either
  ``norm_first`` and ``batch_first``: weights are the same), then ``output``. ``pad_id``: the padding id our model
  derives masks from when none are passed (``None``: no padding). ``options``: ``position_encoding``,
  ``scale_embeddings``, ``max_len`` and ``pad_id``, as in :func:`torch_transformer_config`.
  """
  import torch  # the caller handed us torch modules

  bundle = torch.nn.ModuleDict(
    dict(
      transformer=transformer, source_embed=source_embed, target_embed=target_embed, output=output
    )
  )
  return convert_in(
    bundle,
    lambda dtype: torch_transformer_config(
      transformer, source_embed, target_embed, **options, dtype=dtype
    ),
    Transformer,
    torch_transformer_mapping,
    dtype,
  )


def to_torch_transformer(model: Transformer, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> the state dict of ``nn.ModuleDict(transformer=, source_embed=, target_embed=, output=)``."""
  return export_state(model, params, torch_transformer_mapping(model.config), as_torch)
