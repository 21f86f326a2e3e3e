"""Greedy decoding tokens/s: ``transformer_jax.generation.generate`` against ``GPT2LMHeadModel.generate``.

    python -m benchmarks.decode [--shapes gpt2-small small] [--batches 1 8] [--prompt 16] [--new 64]
        [--dtypes float32 bfloat16]
    python -m benchmarks.decode --model marian ...   # beam search of an encoder-decoder: see decode_seq2seq

One randomly initialised ``GPT2LMHeadModel`` per shape (built from a config, no download) is converted with
``transformer_jax.convert.from_gpt2``, so both sides hold the same weights. Both decode ``--new`` tokens greedily after
the same random ``--prompt``-token prompt, never stopping early; a call's time includes the prompt's prefill, and the
first (compiling) call is excluded. The decodes of one shape and batch are timed in ``--repeats`` interleaved rounds
(one decode of each per round, medians, ``--pause`` seconds idle before each), so a drift in the machine's speed
reaches all of them alike. ``match`` is the fraction of generated tokens on which the two agree (float32).

Decoding one token at a small batch reads every weight once, so memory bandwidth bounds it: ``bound_tokens_s`` is
``batch x bandwidth / weight bytes``. The bandwidth (``bandwidth_GBs``) is measured in the same rounds as the decodes
it bounds, the sum of a 512 MiB float32 array timed as one more call of each round (its fastest), since a shared
machine's bandwidth moves from minute to minute (27.5 and 42.6 GB/s on one 2-core VM, twenty minutes apart).
``bfloat16`` rows decode our model with bf16 weights (half the bytes to read); Hugging Face stays in float32.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import (
  bandwidth_probe,
  interleaved_samples,
  keep_host_memory,
  machine_info,
  print_machine,
  print_table,
  tree_bytes,
  write_json,
)
from transformer_jax.convert import from_gpt2
from transformer_jax.generation import generate

SHAPES = {
  'gpt2-small': dict(n_layer=12, n_head=12, n_embd=768),
  'small': dict(n_layer=6, n_head=6, n_embd=384),
}


def hf_model(shape: str, vocab: int):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  torch.manual_seed(0)
  # No end token: every row decodes exactly --new tokens on both sides.
  config = GPT2Config(
    vocab_size=vocab, n_positions=1024, bos_token_id=None, eos_token_id=None, **SHAPES[shape]
  )
  return GPT2LMHeadModel(config).eval()


def hf_call(model, prompt: np.ndarray, new: int):
  """``(call, tokens)``: a call that decodes ``prompt`` with transformers and waits for it, and its first (warm-up)
  call's new tokens."""
  import torch

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = model.to(device)
  ids = torch.from_numpy(prompt.astype(np.int64)).to(device)
  mask = torch.ones_like(ids)

  def call():
    with torch.inference_mode():
      out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
      )
    return out.cpu()

  return call, call()[:, prompt.shape[1] :].numpy()


def our_call(model, params, prompt: np.ndarray, new: int):
  """``(call, tokens)`` as :func:`hf_call`, by ``generate``; the first call compiles."""
  prompt = jnp.asarray(prompt)

  def call():
    return jax.block_until_ready(
      generate(model, params, prompt, max_new_tokens=new, temperature=None)
    )

  return call, np.asarray(call())


def main(argv=None):
  keep_host_memory()
  # --model marian hands every other flag to the encoder-decoder benchmark, which has its own
  choice = argparse.ArgumentParser(add_help=False)
  choice.add_argument('--model', choices=['gpt2', 'marian'], default='gpt2')
  known, rest = choice.parse_known_args(argv)
  if known.model == 'marian':
    from benchmarks import decode_seq2seq

    return decode_seq2seq.main(rest)

  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--model', choices=['gpt2', 'marian'], default='gpt2', help='marian: see decode_seq2seq'
  )
  parser.add_argument(
    '--shapes', nargs='+', choices=sorted(SHAPES), default=['gpt2-small', 'small']
  )
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--prompt', type=int, default=16, help='prompt tokens')
  parser.add_argument('--new', type=int, default=64, help='generated tokens')
  parser.add_argument('--vocab', type=int, default=50257)
  parser.add_argument(
    '--dtypes',
    nargs='+',
    choices=['float32', 'bfloat16'],
    default=['float32', 'bfloat16'],
    help="our weights' dtypes",
  )
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--pause',
    type=float,
    default=0.3,
    help="untimed seconds of sleep before each timed decode, so none starts while PyTorch's threads still spin",
  )
  parser.add_argument('--out', default='benchmarks/results/decode.json')
  args = parser.parse_args(argv)

  info = machine_info()
  print_machine(info)
  probe, probe_bytes = bandwidth_probe()
  rows = []
  for shape in args.shapes:
    hf = hf_model(shape, args.vocab)
    ours = {dtype: from_gpt2(hf, dtype=dtype) for dtype in args.dtypes}
    for batch in args.batches:
      prompt = np.random.default_rng(batch).integers(
        0, args.vocab, (batch, args.prompt), dtype=np.int32
      )
      hf_decode, hf_tokens = hf_call(hf, prompt, args.new)
      hf_bytes = tree_bytes(ours['float32'][1]) if 'float32' in ours else None
      calls = [hf_decode]
      results = [
        ({'shape': shape, 'batch': batch, 'impl': 'transformers', 'dtype': 'float32'}, hf_bytes)
      ]
      for dtype, (model, params) in ours.items():
        decode, tokens = our_call(model, params, prompt, args.new)
        row = {'shape': shape, 'batch': batch, 'impl': 'jax', 'dtype': dtype}
        if dtype == 'float32':
          row['match'] = float(np.mean(tokens == hf_tokens))
        calls.append(decode)
        results.append((row, tree_bytes(params)))
      # one decode of each and the bandwidth probe per round: the machine's drift reaches every ratio equally
      *samples, probe_samples = interleaved_samples(
        [*calls, probe], warmup=0, repeats=args.repeats, pause_s=args.pause
      )
      seconds = [statistics.median_high(times) for times in samples]
      bandwidth = probe_bytes / min(probe_samples)  # a bound: the most it read in these rounds
      print(f'memory bandwidth {bandwidth / 1e9:.1f} GB/s in these rounds', flush=True)
      hf_s = seconds[0]
      float32_s = dict(zip(ours, seconds[1:])).get('float32')
      for (row, weight_bytes), s in zip(results, seconds, strict=True):
        row['s'] = s
        row['tokens_s'] = batch * args.new / row['s']
        row['ms_per_step'] = row['s'] / args.new * 1e3
        row['vs_transformers'] = hf_s / row['s']
        if row['impl'] == 'jax' and float32_s:
          row['vs_float32'] = float32_s / row['s']  # the speed-up bf16 weights give
        if weight_bytes:
          row['weights_MB'] = weight_bytes / 1e6
          row['bandwidth_GBs'] = bandwidth / 1e9
          row['bound_tokens_s'] = batch * bandwidth / weight_bytes
          row['pct_of_bound'] = 100 * row['tokens_s'] / row['bound_tokens_s']
        rows.append(row)
        print({k: v for k, v in row.items() if k != 's'}, flush=True)
  print()
  print_table(
    rows,
    [
      'shape',
      'batch',
      'impl',
      'dtype',
      'weights_MB',
      'ms_per_step',
      'tokens_s',
      'bandwidth_GBs',
      'bound_tokens_s',
      'pct_of_bound',
      'vs_transformers',
      'vs_float32',
      'match',
    ],
  )
  write_json(args.out, 'decode', info, vars(args), rows)


if __name__ == '__main__':
  main()
