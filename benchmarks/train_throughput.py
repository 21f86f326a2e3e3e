"""Training-step throughput of our GPT, encoder-decoder and BERT against PyTorch (eager and ``torch.compile``).

    python -m benchmarks.train_throughput [--models gpt seq2seq bert] [--batch 8] [--seq 256]
        [--gpt-shape course|gpt2-small] [--gpt-layers N] [--seq2seq-layers 2] [--bert-layers 2]
        [--bert-targets masked|all] [--dropout 0.0]
        [--override fused_qkv=True] [--precision float32 bfloat16]
    python -m benchmarks.train_throughput --models gpt --gpt-shape gpt2-small --seq 1024   # GPT-2 small, on a GPU

Each model is built twice with the same shapes: ours in Flax and its PyTorch counterpart (``torch_reference.NanoGPT``
for the course GPT, Hugging Face's ``GPT2LMHeadModel`` for GPT-2 small, ``torch_reference.Seq2SeqTransformer`` for the
course encoder-decoder, Hugging Face's ``BertForMaskedLM`` from a config, random init, 15% of positions predicted
as in masked-LM training). One step is forward,
cross-entropy, backward and AdamW, in three forms: ours in Linen (``jax``), the same model and update the NNX way
(``jax nnx``: ``transformer_jax.nnx``, an ``nnx.Optimizer``, one ``nnx.jit``), and PyTorch (for the course GPT also
``torch sdpa``: ``benchmarks/sdpa_gpt.py``, nanoGPT's layout with ``F.scaled_dot_product_attention``). Warm-up
(compilation) is excluded and timed separately; each JAX step ends in ``block_until_ready``, each PyTorch step in
``loss.item()``. Every implementation is built and warmed up first, then timed in ``--repeats`` interleaved rounds
(one step of each per round), so the drift of a shared machine falls on all of them alike. The median step time
gives tokens/s (every input token, source and target for the encoder-decoder),
achieved FLOP/s from the matmul count (6 x dense weights + 12 x L x D x context per token, the usual estimate, with
no discount for causal masking) and the model FLOPs utilisation against the machine's peak (measured with a large
float32 ``jnp.dot`` on CPU, the datasheet bf16 peak on a GPU/TPU). ``--precision bfloat16`` rows compute in bf16 on
both sides (our ``dtype='bfloat16'`` with float32 master weights; ``torch.autocast`` around PyTorch's forward), the
default on a GPU/TPU; on GPUs ours asks for cuDNN attention.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import transformer_jax.nnx as tnnx
from benchmarks.harness import (
  adamw_step,
  keep_host_memory,
  machine_info,
  next_token_loss,
  on_accelerator,
  peak_flops,
  print_machine,
  print_table,
  time_interleaved,
  torch_matmul_peak,
  write_json,
)
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

# the same AdamW on both sides (optax's default decay is 1e-4, PyTorch's 1e-2)
LR, WEIGHT_DECAY = (
  3e-4,
  0.01,
)


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
  keys = case.init_keys or tuple(case.batch)
  init_args = [jnp.asarray(case.batch[k][:1, :8]) for k in keys]
  return jax.jit(case.model.init)(jax.random.key(0), *init_args)['params']


def linen_step(case: Case):
  """``(optimizer, step)`` of our Linen model's AdamW step (:func:`benchmarks.harness.adamw_step`),
  ``step(params, opt_state, batch, dropout_key) -> (params, opt_state, loss)``."""

  def loss(params, batch, rng):
    return case.loss(
      functools.partial(case.model.apply, {'params': params}, rngs={'dropout': rng}), batch
    )

  return adamw_step(loss, LR, WEIGHT_DECAY)


@dataclasses.dataclass
class Prepared:
  """One implementation's compiled, warmed-up training step: ``call()`` runs one step and waits for it."""

  impl: str
  call: Callable[[], object]
  compile_s: float | None
  params_M: float


def compiled_jax_step(case: Case):
  """``(compiled, state, batch, rng, compile_s)``: our Linen AdamW step compiled with the parameters and optimizer
  state donated, ``state = [params, opt_state]`` to feed it, the batch already on the device (the step never waits
  for the host)."""
  optimizer, step = linen_step(case)
  params = init_params(case)
  opt_state = optimizer.init(params)
  batch = jax.device_put(case.batch)
  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch, rng).compile()
  return compiled, [params, opt_state], batch, rng, time.perf_counter() - start


def prepare_jax(case: Case) -> Prepared:
  compiled, state, batch, rng, compile_s = compiled_jax_step(case)
  # counted now: the step donates these buffers
  params_m = sum(x.size for x in jax.tree.leaves(state[0])) / 1e6

  def call():
    state[0], state[1], loss = compiled(state[0], state[1], batch, rng)
    return jax.block_until_ready(loss)

  return Prepared('jax', call, compile_s, params_m)


def prepare_nnx(case: Case) -> Prepared:
  """The same step the NNX way: our model as an ``nnx.Module`` (``transformer_jax.nnx``), an ``nnx.Optimizer`` with
  the same AdamW, ``nnx.value_and_grad`` and ``optimizer.update`` in one ``nnx.jit`` that donates both."""
  model = tnnx.from_linen(case.model, init_params(case))
  optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WEIGHT_DECAY), wrt=nnx.Param)
  params_m = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6

  @functools.partial(nnx.jit, donate_argnums=(0, 1))
  def step(model, optimizer, batch, rng):
    def loss(model):
      # the stream is made inside the traced function, where its draw may update it
      return case.loss(lambda *a, **k: model(*a, rngs=nnx.Rngs(dropout=rng), **k), batch)

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  batch = jax.device_put(case.batch)
  rng = jax.random.key(1)
  call = lambda: jax.block_until_ready(step(model, optimizer, batch, rng))  # noqa: E731
  start = time.perf_counter()
  call()  # compiles
  return Prepared('jax nnx', call, time.perf_counter() - start, params_m)


def prepare_torch(case: Case, compile_model: bool, bf16: bool, build=None, impl=None) -> Prepared:
  """A PyTorch training step of ``case.torch_model`` (or ``build``), under ``torch.autocast`` in bfloat16 when
  ``bf16`` (master weights and AdamW in float32, as ours)."""
  import torch

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  module = (build or case.torch_model)().to(device).train()
  params_m = sum(p.numel() for p in module.parameters()) / 1e6
  model = torch.compile(module) if compile_model else module
  optimizer = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  batch = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in case.batch.items()}
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

  def call():
    with autocast:
      loss = case.torch_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  start = time.perf_counter()
  call()  # torch.compile compiles here; eager warms its caches
  first_s = time.perf_counter() - start
  name = impl or ('torch.compile' if compile_model else 'torch eager')
  return Prepared(name, call, first_s if compile_model else None, params_m)


def time_case(case: Case, args, bf16: bool, peak: float) -> list[dict]:
  """The rows of one case at one precision: ours (Linen, NNX), PyTorch eager, its peers, ``torch.compile``.

  Every implementation is built and warmed up first, then timed in interleaved rounds (one step of each per round),
  so a change in what else the machine is doing falls on all of them alike."""
  prepared, failed = [prepare_jax(case)], []
  if not args.no_nnx:
    prepared.append(prepare_nnx(case))
  if not args.no_torch:
    prepared.append(prepare_torch(case, compile_model=False, bf16=bf16))
    for impl, build in case.torch_peers.items():
      prepared.append(prepare_torch(case, False, bf16, build=build, impl=impl))
    if not args.no_torch_compile:
      try:
        prepared.append(prepare_torch(case, compile_model=True, bf16=bf16))
      except Exception as e:  # noqa: BLE001 (a compiler failure is a result to report, not a crash)
        failed.append(
          {'impl': 'torch.compile', 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'}
        )
  seconds = time_interleaved(
    [p.call for p in prepared], warmup=1, repeats=args.repeats, pause_s=args.pause
  )
  results = [
    {'impl': p.impl, 'step_s': s, 'compile_s': p.compile_s, 'params_M': p.params_M}
    for p, s in zip(prepared, seconds)
  ]
  rows, jax_s = [], results[0]['step_s']
  for r in results + failed:
    row = {'model': case.name, 'precision': 'bf16' if bf16 else 'f32', **r}
    if 'step_s' in r:
      s = r['step_s']
      row.update(
        step_ms=s * 1e3,
        tokens_s=case.tokens / s,
        gflop_s=case.flops / s / 1e9,
        mfu_pct=100 * case.flops / s / peak,
        jax_speedup=s / jax_s,
      )
    rows.append(row)
    print({k: v for k, v in row.items() if k != 'step_s'}, flush=True)
  return rows


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


def main():
  keep_host_memory()
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--models', nargs='+', choices=sorted(CASES), default=['gpt', 'seq2seq', 'bert']
  )
  add_shape_arguments(parser)
  parser.add_argument(
    '--repeats',
    type=int,
    default=5,
    help='timed rounds, one step of each implementation per round (median reported)',
  )
  parser.add_argument(
    '--pause',
    type=float,
    default=0.3,
    help='untimed seconds of sleep before each timed step, so no step starts while the previous '
    "one's thread pool still spins (0: back to back)",
  )
  parser.add_argument(
    '--precision',
    nargs='+',
    choices=['float32', 'bfloat16'],
    default=None,
    help='float32 and/or bfloat16 rows (default: float32 on a CPU, bfloat16 on a GPU/TPU)',
  )
  parser.add_argument('--no-torch', action='store_true', help='ours only')
  parser.add_argument('--no-nnx', action='store_true', help='no row for our models in NNX')
  parser.add_argument('--no-torch-compile', action='store_true')
  parser.add_argument('--out', default='benchmarks/results/train_throughput.json')
  args = parser.parse_args()

  overrides = {}
  if jax.default_backend() == 'gpu':
    overrides['attention_implementation'] = 'cudnn'
  overrides.update(parse_overrides(args.override))
  precisions = args.precision or (['bfloat16'] if on_accelerator() else ['float32'])
  info = machine_info()
  print_machine(info)
  peak, peak_source = peak_flops()
  print(
    f'peak {peak / 1e9:,.0f} GFLOP/s ({peak_source}); our config overrides: {overrides}', flush=True
  )
  torch_peak = None
  if not on_accelerator() and not args.no_torch:
    torch_peak = torch_matmul_peak()
    print(f'torch.mm float32 2048^2: {torch_peak / 1e9:,.0f} GFLOP/s', flush=True)

  rows = []
  for name in args.models:
    for precision in precisions:
      # bfloat16: our compute dtype with float32 master weights (param_dtype); PyTorch under torch.autocast
      case = CASES[name](args, {'dtype': precision, **overrides})
      rows += time_case(case, args, precision == 'bfloat16', peak)
  print()
  print_table(
    rows,
    [
      'model',
      'precision',
      'impl',
      'params_M',
      'step_ms',
      'tokens_s',
      'gflop_s',
      'mfu_pct',
      'jax_speedup',
      'compile_s',
      'error',
    ],
  )
  write_json(
    args.out,
    'train_throughput',
    info,
    {
      **vars(args),
      'overrides': overrides,
      'precisions': precisions,
      'peak_flops': peak,
      'peak_source': peak_source,
      'torch_matmul_peak_flops': torch_peak,
    },
    rows,
  )


if __name__ == '__main__':
  main()
