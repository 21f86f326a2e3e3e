"""The GPT-2 spec: Hugging Face's ``GPT2LMHeadModel`` and ``GPT2Model`` <-> our :class:`~transformer_jax.GPT`.

Configs travel as plain dicts (``config.json``, or ``hf_model.config.to_dict()``), so that nothing here needs
``transformers``; torch is imported only when a torch object is handed in or asked for.
"""

from __future__ import annotations

from transformer_jax.convert.hf_options import HF_ACTIVATIONS, activation, refuse
from transformer_jax.convert.rules import CLASSIC_BLOCKS, Mapping, dense, norm, qkv, require, table
from transformer_jax.convert.spec import Spec, export, load
from transformer_jax.models import GPT, GPTConfig

# Our field -> the GPT2Config key, and GPT2Config's defaults for the keys a config.json may omit.
_FIELDS = {
  'vocab_size': 'vocab_size',
  'max_len': 'n_positions',
  'num_layers': 'n_layer',
  'd_model': 'n_embd',
  'num_heads': 'n_head',
  'norm_eps': 'layer_norm_epsilon',
  'dropout_rate': 'resid_pdrop',
  'attention_dropout_rate': 'attn_pdrop',
}
_HF_DEFAULTS = {'layer_norm_epsilon': 1e-5, 'resid_pdrop': 0.1, 'attn_pdrop': 0.1}


def _more_from_hf(hf: dict) -> dict:
  """Fused Q/K/V and a tied head come from the GPTConfig defaults, like the checkpoint."""
  refuse(
    hf,
    scale_attn_weights=(True,),
    scale_attn_by_inverse_layer_idx=(False,),
    add_cross_attention=(False,),
  )
  return dict(
    d_ff=hf.get('n_inner') or 4 * hf['n_embd'],
    activation=activation(hf.get('activation_function', 'gelu_new')),
    init_std=hf.get('initializer_range', 0.02),
  )


def _more_to_hf(config: GPTConfig, architecture: str) -> dict:
  return dict(
    n_inner=config.d_ff,
    activation_function=HF_ACTIVATIONS[config.activation],
    embd_pdrop=config.dropout_rate,
    initializer_range=config.init_std or 0.02,
    tie_word_embeddings=True,
  )


def check_gpt2(config: GPTConfig) -> None:
  """Raises :class:`ConversionError` for a model GPT-2 cannot express."""
  require(
    config,
    'GPT-2',
    pre_norm=(True,),
    final_norm=(True,),
    qkv_bias=(True,),
    tie_output=(True,),
    output_bias=(False,),
    position_encoding=('learned',),
    norm_variant=('standard',),
    activation=tuple(HF_ACTIVATIONS),
    **CLASSIC_BLOCKS,
  )


def _mapping(config: GPTConfig, architecture: str) -> Mapping:
  """HF GPT-2 names (``transformer.`` prefixed with the LM head) -> ours. ``Conv1D`` stores ``[in, out]``."""
  head = architecture == 'GPT2LMHeadModel'
  p = 'transformer.' if head else ''
  rules = [table('token_embed', f'{p}wte.weight'), table('positions', f'{p}wpe.weight')]
  for i in range(config.num_layers):
    ours, h = f'decoder/layers_{i}', f'{p}h.{i}.'
    rules += norm(f'{ours}/self_attention_norm', f'{h}ln_1') + norm(f'{ours}/ffn_norm', f'{h}ln_2')
    rules += qkv(
      f'{ours}/self_attention',
      f'{h}attn.c_attn.weight',
      f'{h}attn.c_attn.bias',
      fused=config.fused_qkv,
      transpose=False,
    )
    rules += dense(f'{ours}/self_attention/out', f'{h}attn.c_proj', n_in=2, transpose=False)
    rules += dense(f'{ours}/ffn/fc_in', f'{h}mlp.c_fc', transpose=False)
    rules += dense(f'{ours}/ffn/fc_out', f'{h}mlp.c_proj', transpose=False)
  rules += norm('decoder/final_norm', f'{p}ln_f')
  # causal-mask buffers of older checkpoints
  return Mapping(
    tuple(rules),
    aliases={'lm_head.weight': f'{p}wte.weight'} if head else {},
    buffers=(r'.*\.attn\.(bias|masked_bias)',),
  )


def _architecture_of_state(state: dict) -> str:
  return 'GPT2LMHeadModel' if any(k.startswith('transformer.') for k in state) else 'GPT2Model'


GPT2 = Spec(
  model_type='gpt2',
  architectures={'GPT2LMHeadModel': GPT, 'GPT2Model': GPT},
  config_class=GPTConfig,
  fields=_FIELDS,
  hf_defaults=_HF_DEFAULTS,
  more_from_hf=_more_from_hf,
  more_to_hf=_more_to_hf,
  check=check_gpt2,
  mapping=_mapping,
  architecture_of_state=_architecture_of_state,
  # a GPT without learned positions (rotary: Llama, Qwen2) is another format's
  describes=lambda config: config.position_encoding == 'learned',
)


def gpt2_hf_config(config: GPTConfig, head: bool = True) -> dict:
  """:class:`GPTConfig` -> a ``config.json`` dict for ``GPT2LMHeadModel`` (``head``) or ``GPT2Model``."""
  return GPT2.hf_config(config, 'GPT2LMHeadModel' if head else 'GPT2Model')


def gpt2_mapping(config: GPTConfig, head: bool = True) -> Mapping:
  """The name table of ``GPT2LMHeadModel`` (``head``) or ``GPT2Model``."""
  return GPT2.table(config, 'GPT2LMHeadModel' if head else 'GPT2Model')


def from_gpt2(model_or_state, config=None, *, dtype=None) -> tuple[GPT, dict]:
  """``GPT2LMHeadModel``/``GPT2Model`` (or a state dict plus its config, a ``GPT2Config`` or dict) -> ``(GPT,
  params)``. ``dtype``: the params' dtype (default: the checkpoint's)."""
  return load(GPT2, model_or_state, config, dtype=dtype)


def to_gpt2(model: GPT, params: dict, *, head: bool = True, as_torch: bool = False) -> dict:
  """Our GPT params -> a ``GPT2LMHeadModel`` (``head``) or ``GPT2Model`` state dict (numpy, or torch tensors)."""
  return export(GPT2, model, params, 'GPT2LMHeadModel' if head else 'GPT2Model', as_torch)
