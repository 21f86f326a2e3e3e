"""What ``python -m benchmarks.train_throughput`` trains: each family on both sides, the same shapes and batch.

A :class:`Case` holds our Flax model and its loss, the PyTorch counterpart and its loss, the batch, and the step's
tokens and model FLOPs. ``CASES`` builds one per family from the shape flags (:func:`add_shape_arguments`) and a
dict of our config's fields (``--override``): ``gpt`` (the course shape against ``torch_reference.NanoGPT`` and
nanoGPT's SDPA layout, or GPT-2 small against Hugging Face's ``GPT2LMHeadModel``), ``seq2seq`` (the course
encoder-decoder against ``torch_reference.Seq2SeqTransformer``) and ``bert`` (masked-LM training against
``BertForMaskedLM``). ``benchmarks/step_profile.py``, ``cpu_products.py`` and ``page_faults.py`` build the same cases.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import next_token_loss
from train.data import mask_positions
from transformer_jax import (
  GPT,
  BERTConfig,
  BERTForMaskedLM,
  GPTConfig,
  Transformer,
  TransformerConfig,
)
from transformer_jax.convert.bert import bert_hf_config
from transformer_jax.convert.gpt2 import gpt2_hf_config


@dataclasses.dataclass
class Case:
  """One model family on both sides, with the same shapes and the same batch."""

  name: str
  model: Any  # our Flax module
  # (call, batch) -> scalar; call(*inputs, deterministic=...) runs our model on its weights and dropout key (Linen's
  # apply or the NNX model itself)
  loss: Callable
  batch: dict  # numpy int arrays
  torch_model: Any  # builds the PyTorch module
  torch_loss: Callable  # (module, batch as torch tensors) -> scalar
  tokens: int  # input tokens per step
  flops: float  # model FLOPs per step (forward + backward)
  # other PyTorch models of the same shapes, by row name: builders of modules torch_loss takes too
  torch_peers: dict = dataclasses.field(default_factory=dict)
  init_keys: tuple | None = None  # the batch arrays the model takes positionally (default: all)


def torch_xent(logits, labels):
  import torch

  return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def dense_flops(layers: int, d: int, f: int, attn_projections: int = 4) -> int:
  """Multiply-adds x 2 of one token through ``layers`` blocks' weight matmuls (forward)."""
  return 2 * layers * (attn_projections * d * d + 2 * d * f)


def attention_flops(layers: int, d: int, context: int) -> int:
  """``q k^T`` and ``weights v`` of one query over ``context`` keys in every layer (forward)."""
  return 4 * layers * d * context


def gpt_case(args, overrides: dict) -> Case:
  """``--gpt-shape course``: ``GPTConfig.course()`` against ``torch_reference.NanoGPT``; ``gpt2-small``:
  ``GPTConfig.gpt2()`` against Hugging Face's ``GPT2LMHeadModel``."""
  if args.gpt_shape == 'course':
    from transformer_jax.torch_reference import NanoGPT

    # The reference has no attention-weight dropout; neither has ours here.
    cfg = GPTConfig.course(
      max_len=args.seq, dropout_rate=args.dropout, attention_dropout_rate=0.0, **overrides
    )
  else:
    cfg = GPTConfig.gpt2(
      'small',
      max_len=args.seq,
      dropout_rate=args.dropout,
      attention_dropout_rate=args.dropout,
      **overrides,
    )
  cfg = cfg.replace(num_layers=args.gpt_layers or cfg.num_layers)
  model = GPT(cfg)

  def loss(call, batch):
    ids = batch['ids']
    logits = call(ids[:, :-1], deterministic=args.dropout == 0)
    return next_token_loss(logits, ids[:, 1:])

  def torch_model():
    if args.gpt_shape == 'course':
      return NanoGPT(
        vocab_size=cfg.vocab_size,
        block_size=args.seq,
        n_embd=cfg.d_model,
        n_head=cfg.num_heads,
        n_layer=cfg.num_layers,
        dropout=args.dropout,
      )
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config.from_dict(gpt2_hf_config(cfg)))

  def torch_loss(m, b):
    out = m(b['ids'][:, :-1])
    return torch_xent(out.logits if hasattr(out, 'logits') else out, b['ids'][:, 1:])

  peers = {}
  if args.gpt_shape == 'course':
    from benchmarks.sdpa_gpt import SdpaGPT

    peers['torch sdpa'] = lambda: SdpaGPT(
      cfg.vocab_size, args.seq, cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.d_ff, args.dropout
    )

  ids = np.random.default_rng(0).integers(
    0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32
  )
  per_token = dense_flops(cfg.num_layers, cfg.d_model, cfg.d_ff) + 2 * cfg.d_model * cfg.vocab_size
  return Case(
    'gpt',
    model,
    loss,
    {'ids': ids},
    torch_model,
    torch_loss,
    args.batch * args.seq,
    3
    * args.batch
    * args.seq
    * (per_token + attention_flops(cfg.num_layers, cfg.d_model, args.seq)),
    peers,
  )


def seq2seq_case(args, overrides: dict) -> Case:
  from transformer_jax.torch_reference import Seq2SeqTransformer

  cfg = TransformerConfig.course(
    num_layers=args.seq2seq_layers,
    max_len=args.seq + 1,
    dropout_rate=args.dropout,
    attention_dropout_rate=0.0,
    **overrides,
  )
  model = Transformer(cfg)

  def loss(call, batch):
    tgt = batch['tgt']
    logits = call(batch['src'], tgt[:, :-1], deterministic=args.dropout == 0)
    return next_token_loss(logits, tgt[:, 1:])

  # ids from 1: no padding, but both sides still build and apply their masks
  rng = np.random.default_rng(0)
  src = rng.integers(1, cfg.src_vocab_size, (args.batch, args.seq), dtype=np.int32)
  tgt = rng.integers(1, cfg.tgt_vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
  d, f, layers, n = cfg.d_model, cfg.d_ff, cfg.num_layers, args.batch * args.seq
  encoder = n * (dense_flops(layers, d, f) + attention_flops(layers, d, args.seq))
  # self- and cross-attention
  decoder = n * (
    dense_flops(layers, d, f, attn_projections=8)
    + 2 * d * cfg.tgt_vocab_size
    + attention_flops(2 * layers, d, args.seq)
  )
  return Case(
    'seq2seq',
    model,
    loss,
    {'src': src, 'tgt': tgt},
    lambda: Seq2SeqTransformer(
      cfg.src_vocab_size,
      cfg.tgt_vocab_size,
      d_model=d,
      num_layers=layers,
      num_heads=cfg.num_heads,
      d_ff=f,
      max_seq_length=args.seq + 1,
      dropout=args.dropout,
    ),
    lambda m, b: torch_xent(m(b['src'], b['tgt'][:, :-1]), b['tgt'][:, 1:]),
    2 * n,
    3 * (encoder + decoder),
  )


def bert_case(args, overrides: dict) -> Case:
  """Masked-LM training as each side's users run it (``--bert-targets masked``): the same 15% of positions in each
  row are predicted; ours runs the head at those positions only (``masked_positions``), Hugging Face's
  ``BertForMaskedLM`` at every position with ``-100`` labels elsewhere. ``--bert-targets all``: every position is a
  target on both sides, the head's full cost."""
  from transformers import BertConfig, BertForMaskedLM

  cfg = BERTConfig(
    num_layers=args.bert_layers,
    max_len=max(512, args.seq),
    dropout_rate=args.dropout,
    attention_dropout_rate=args.dropout,
    **overrides,
  )
  model = BERTForMaskedLM(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
  if args.bert_targets == 'all':
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), ids.shape)
  else:  # every token is a regular one here
    positions = mask_positions(np.ones(ids.shape, bool), 0.15, rng)[0].astype(np.int32)
  batch = {'ids': ids, 'positions': positions, 'targets': np.take_along_axis(ids, positions, 1)}

  def loss(call, batch):
    positions = None if args.bert_targets == 'all' else batch['positions']
    logits = call(batch['ids'], masked_positions=positions, deterministic=args.dropout == 0)
    return next_token_loss(logits, batch['targets'])

  def torch_loss(m, b):
    import torch

    labels = torch.full_like(b['ids'], -100).scatter_(1, b['positions'], b['targets'])
    logits = m(input_ids=b['ids']).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

  hf = BertConfig.from_dict(bert_hf_config(cfg, 'BertForMaskedLM'))
  d = cfg.d_model
  encoder = dense_flops(cfg.num_layers, d, cfg.d_ff) + attention_flops(cfg.num_layers, d, args.seq)
  head = 2 * d * d + 2 * d * cfg.vocab_size  # MLM transform, decoder: at the predicted positions
  return Case(
    'bert',
    model,
    loss,
    batch,
    lambda: BertForMaskedLM(hf),
    torch_loss,
    args.batch * args.seq,
    3 * (ids.size * encoder + positions.size * head),
    init_keys=('ids',),
  )


CASES = {'gpt': gpt_case, 'seq2seq': seq2seq_case, 'bert': bert_case}


def init_params(case: Case):
  """The case's model's parameters (key 0), initialised on one token of each input: no weight's shape depends on
  the length, and a GPT's batch rows are one token longer than its positions."""
  keys = case.init_keys or tuple(case.batch)
  init_args = [jnp.asarray(case.batch[k][:1, :1]) for k in keys]
  return jax.jit(case.model.init)(jax.random.key(0), *init_args)['params']


def parse_value(text: str):
  """``'True'`` -> True, ``'2'`` -> 2, ``'none'`` -> ``'none'``: a Python literal, else the string itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
  """The batch, context, model shapes, dropout and ``--override`` fields that the ``CASES`` builders read."""
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument(
    '--seq', type=int, default=256, help='context length (source and target for seq2seq)'
  )
  parser.add_argument(
    '--gpt-shape',
    choices=['course', 'gpt2-small'],
    default='course',
    help='course: 6 x 384 vs torch_reference.NanoGPT; gpt2-small: 12 x 768 vs GPT2LMHeadModel',
  )
  parser.add_argument('--gpt-layers', type=int, default=None, help="default: the shape's own depth")
  parser.add_argument(
    '--seq2seq-layers', type=int, default=2, help='encoder layers = decoder layers'
  )
  parser.add_argument('--bert-layers', type=int, default=2)
  parser.add_argument(
    '--bert-targets',
    choices=['masked', 'all'],
    default='masked',
    help='masked: 15%% of positions predicted, as in MLM training (our head runs there only); all: every position',
  )
  parser.add_argument('--dropout', type=float, default=0.0)
  parser.add_argument(
    '--override',
    action='append',
    default=[],
    metavar='FIELD=VALUE',
    help='a config field of our models, e.g. fused_qkv=True or scan_layers=True (repeatable)',
  )


def parse_overrides(items: list[str]) -> dict:
  """``['fused_qkv=True']`` -> ``{'fused_qkv': True}``."""
  return dict((field, parse_value(value)) for field, value in (i.split('=', 1) for i in items))
