"""The PyTorch models of the course (:mod:`transformer_jax.torch_reference`, or the course notebooks' own classes,
which share their names) <-> ours. Hyperparameters are read off the modules themselves."""

from __future__ import annotations

from transformer_jax.convert.engine import export_state
from transformer_jax.convert.rules import CLASSIC_BLOCKS, Mapping, dense, norm, qkv, require, table
from transformer_jax.convert.spec import convert_in
from transformer_jax.models import GPT, GPTConfig, Transformer, TransformerConfig

# The layer choices both course models fix.
_COURSE_LAYERS = ('norm_variant', 'pre_norm', 'final_norm', 'activation', 'qkv_bias')
_COURSE_EMBEDDINGS = ('tie_output', 'position_encoding')


def _require_course(config, course, what: str, fields: tuple[str, ...]) -> None:
  """The reference models have one architecture, the course preset's: the fields both fix and the model's own
  ``fields`` must keep its values."""
  fixed = _COURSE_LAYERS + _COURSE_EMBEDDINGS + fields
  require(config, what, **{field: (getattr(course, field),) for field in fixed}, **CLASSIC_BLOCKS)


def reference_transformer_mapping(config: TransformerConfig) -> Mapping:
  """Names of :class:`~transformer_jax.torch_reference.Seq2SeqTransformer` (the course notebook's names) -> ours."""
  _require_course(
    config,
    TransformerConfig.course(),
    "the course's encoder-decoder",
    ('share_embeddings', 'scale_embeddings', 'scale_decoder_output'),
  )
  rules = [
    table('source_embed', 'encoder.embedding.weight'),
    table('target_embed', 'decoder.embedding.weight'),
  ]

  def attention(ours, t, fused):
    sources = [tuple((f'{t}.W_{n}.{leaf}',) for n in 'qkv') for leaf in ('weight', 'bias')]
    return qkv(ours, *sources, fused=fused) + dense(f'{ours}/out', f'{t}.W_o', n_in=2)

  for stack, count, attentions in (
    ('encoder', config.num_layers, (('self_attention', 'mha'),)),
    ('decoder', config.decoder_layers, (('self_attention', 'mha1'), ('cross_attention', 'mha2'))),
  ):
    for i in range(count):
      ours, t = f'{stack}/layers_{i}', f'{stack}.{stack}_layers.{i}.'
      for n, (sublayer, name) in enumerate(attentions, start=1):
        rules += attention(
          f'{ours}/{sublayer}', t + name, config.fused_qkv and sublayer == 'self_attention'
        )
        rules += norm(f'{ours}/{sublayer}_norm', f'{t}layernorm{n}', 'gamma', 'beta')
      rules += dense(f'{ours}/ffn/fc_in', f'{t}ffn.fc1') + dense(
        f'{ours}/ffn/fc_out', f'{t}ffn.fc2'
      )
      rules += norm(f'{ours}/ffn_norm', f'{t}layernorm{len(attentions) + 1}', 'gamma', 'beta')
  # the seed registers its sinusoid table as a (persistent) buffer
  return Mapping(
    tuple(rules + dense('output', 'final_layer')), buffers=(r'(en|de)coder\.pos_encoding\.pe',)
  )


def from_reference_transformer(reference, *, dtype=None) -> tuple[Transformer, dict]:
  """:class:`~transformer_jax.torch_reference.Seq2SeqTransformer` (or the course notebook's ``Transformer``) ->
  ``(Transformer, params)`` with ``TransformerConfig.course`` settings."""
  enc, dec = reference.encoder, reference.decoder
  layer = enc.encoder_layers[0]
  make_config = lambda dtype: TransformerConfig.course(
    src_vocab_size=enc.embedding.num_embeddings,
    tgt_vocab_size=dec.embedding.num_embeddings,
    d_model=enc.d_model,
    num_heads=layer.mha.num_heads,
    d_ff=layer.ffn.fc1.out_features,
    num_layers=len(enc.encoder_layers),
    num_decoder_layers=len(dec.decoder_layers),
    max_len=enc.pos_encoding.pe.shape[1],
    norm_eps=layer.layernorm1.eps,
    dropout_rate=enc.dropout.p,
    attention_dropout_rate=0.0,
    pad_id=getattr(reference, 'pad_id', 0),
    dtype=dtype,
    param_dtype=dtype,
  )
  return convert_in(reference, make_config, Transformer, reference_transformer_mapping, dtype)


def to_reference_transformer(model: Transformer, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> a :class:`~transformer_jax.torch_reference.Seq2SeqTransformer` state dict."""
  return export_state(model, params, reference_transformer_mapping(model.config), as_torch)


# ------------------------------------------------------------------------------------------------ the course's nanoGPT


def reference_gpt_mapping(config: GPTConfig) -> Mapping:
  """Names of :class:`~transformer_jax.torch_reference.NanoGPT` -> ours. Each head has its own ``(K, D)`` key/query/
  value weight; concatenated over heads they are our ``(D, H, K)`` kernels."""
  _require_course(
    config,
    GPTConfig.course(),
    "the course's nanoGPT",
    ('output_bias',),
  )
  rules = [
    table('token_embed', 'token_embedding_table.weight'),
    table('positions', 'position_embedding_table.weight'),
  ]
  for i in range(config.num_layers):
    ours, t = f'decoder/layers_{i}', f'blocks.{i}.'
    heads = tuple(
      tuple(f'{t}sa.heads.{h}.{n}.weight' for h in range(config.num_heads))
      for n in ('query', 'key', 'value')
    )
    rules += qkv(f'{ours}/self_attention', heads, None, fused=config.fused_qkv)
    rules += dense(f'{ours}/self_attention/out', f'{t}sa.proj', n_in=2)
    rules += dense(f'{ours}/ffn/fc_in', f'{t}ffwd.net.0') + dense(
      f'{ours}/ffn/fc_out', f'{t}ffwd.net.2'
    )
    rules += norm(f'{ours}/self_attention_norm', f'{t}ln1') + norm(f'{ours}/ffn_norm', f'{t}ln2')
  return Mapping(tuple(rules + norm('decoder/final_norm', 'ln_f') + dense('output', 'lm_head')))


def from_reference_gpt(reference, *, dtype=None) -> tuple[GPT, dict]:
  """:class:`~transformer_jax.torch_reference.NanoGPT` -> ``(GPT, params)`` with ``GPTConfig.course`` settings."""
  block = reference.blocks[0]
  d_model = reference.token_embedding_table.embedding_dim
  make_config = lambda dtype: GPTConfig.course(
    vocab_size=reference.token_embedding_table.num_embeddings,
    max_len=reference.position_embedding_table.num_embeddings,
    num_layers=len(reference.blocks),
    d_model=d_model,
    num_heads=len(block.sa.heads),
    d_ff=block.ffwd.net[0].out_features,
    norm_eps=block.ln1.eps,
    dropout_rate=reference.dropout.p,
    attention_dropout_rate=0.0,
    dtype=dtype,
    param_dtype=dtype,
  )
  return convert_in(reference, make_config, GPT, reference_gpt_mapping, dtype)


def to_reference_gpt(model: GPT, params: dict, *, as_torch: bool = False) -> dict:
  """Our params -> a :class:`~transformer_jax.torch_reference.NanoGPT` state dict."""
  return export_state(model, params, reference_gpt_mapping(model.config), as_torch)
