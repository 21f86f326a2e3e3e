"""Beam-search decoding of a Marian-shaped encoder-decoder: ``transformer_jax.generation.translate`` against
``MarianMTModel.generate``, tokens/s and peak memory.

    python -m benchmarks.decode --model marian [--batches 1 8] [--src 32] [--new 32] [--beams 4] [--repeats 3]

The model is a randomly initialised ``MarianMTModel`` of opus-mt's shape (6 + 6 layers, d_model 512, 8 heads, FFN
2048, vocabulary 58101 with pad 58100 = decoder start and eos 0, scaled embeddings), saved once with
``save_pretrained`` to a temporary directory; our side loads that directory with ``transformer_jax.convert.load_hf``,
theirs with ``from_pretrained``, so both hold the same float32 weights. Marian's real activation is ``swish``, which
our converter does not take (``gelu``, ``relu``, ``gelu_new``), so the model uses ``gelu``.

Sources are ``--src`` random ids ending in eos; in a batch of more than one row the second half of the rows is half as
long, right-padded with pad and masked out. Both sides run ``--beams``-beam search for exactly ``--new`` tokens: eos
is banned until then (``min_new_tokens`` on both sides, and no forced eos on theirs). ``tokens_s`` counts new tokens
of the best beam (``new x batch / seconds``): the median of ``--repeats`` calls after a first, compiling call (timed
apart as ``first_call_s``). ``match`` is the fraction of the best beams' tokens on which the two sides agree.

Memory: each (side, batch) runs in its own fresh subprocess, which imports only its own library (ours never imports
torch, theirs never jax). From ``/proc/self/status`` (``ru_maxrss`` would report the parent's peak, which a child
inherits across fork and exec): ``loaded_MB`` is the process's peak resident set (``VmHWM``) once its library is
imported and the weights loaded, transient copies included; ``resident_MB`` its resident set (``VmRSS``) right after,
once glibc's ``malloc_trim`` has handed back the heap pages loading freed. The peak is then reset to that
(``/proc/self/clear_refs``), so ``decode_MB`` is the most resident memory the decoding calls added above it (ours
include XLA compiling the search program in the first call), and ``peak_MB`` is the process's peak overall. On a GPU
``device_peak_MB`` is the accelerator's peak allocation (``torch.cuda.max_memory_allocated``, or XLA's
``peak_bytes_in_use``).

PyTorch's CPU thread pool stalls on a machine whose cores other processes also use (each op waits for a descheduled
worker), so on a CPU the transformers side runs both with torch's own thread count and with one thread (or once per
``--torch-threads``); ``vs_transformers`` divides the fastest transformers time of a batch by each row's, and
``match`` compares with the first transformers run. XLA:CPU uses every core it may run on (``threads``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

VOCAB, PAD, EOS = 58101, 58100, 0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_config():
  from transformers import MarianConfig

  return MarianConfig(
    vocab_size=VOCAB,
    decoder_vocab_size=VOCAB,
    d_model=512,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    activation_function='gelu',  # Marian's is 'swish', which our converter does not take
    scale_embedding=True,
    pad_token_id=PAD,
    decoder_start_token_id=PAD,
    eos_token_id=EOS,
    forced_eos_token_id=None,  # MarianConfig forces eos at the last step by default
  )


def save_model(directory: str) -> None:
  import torch
  from transformers import MarianMTModel

  torch.manual_seed(0)
  MarianMTModel(hf_config()).eval().save_pretrained(directory)


def sources(batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """``(B, S)`` int32 ids (random, ending in eos, right-padded) and their bool validity."""
  ids = np.random.default_rng(batch).integers(1, PAD, (batch, length), dtype=np.int32)
  lengths = np.full(batch, length)
  if batch > 1:
    lengths[batch // 2 :] = length // 2
  valid = np.arange(length) < lengths[:, None]
  ids[np.arange(batch), lengths - 1] = EOS
  return np.where(valid, ids, PAD).astype(np.int32), valid


def _status_mb(key: str) -> float:
  """``VmHWM`` (peak) or ``VmRSS`` (current) resident MiB of this process."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(key + ':')) / 1024


def _loaded() -> dict:
  """The peak so far; then resets the peak to the current resident set, which decoding's peak is measured above."""
  peak = _status_mb('VmHWM')
  try:  # glibc keeps the heap pages the loader freed; decoding would reuse them uncounted
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except OSError:
    pass
  memory = {'loaded_MB': peak, 'resident_MB': _status_mb('VmRSS')}
  memory['base'] = memory['resident_MB']
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:  # no reset: decoding's figure is then only what it added above the loading peak
    memory['base'] = memory['loaded_MB']
  return memory


def _decoded(memory: dict) -> dict:
  peak = _status_mb('VmHWM')
  return {
    'loaded_MB': memory['loaded_MB'],
    'resident_MB': memory['resident_MB'],
    'peak_MB': max(peak, memory['loaded_MB']),
    'decode_MB': peak - memory['base'],
  }


def _timed(call, sync, repeats: int) -> tuple[float, float, object]:
  """``(first call's seconds, median seconds of the next repeats, the first call's output)``: harness.time_call's
  median, kept here because importing the harness would load jax into the transformers process."""
  start = time.perf_counter()
  out = sync(call())
  first = time.perf_counter() - start
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(call())
    seconds.append(time.perf_counter() - start)
  return first, sorted(seconds)[repeats // 2], out


def run_hf(directory: str, batch: int, args) -> dict:
  import torch
  from transformers import MarianMTModel

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads[0])
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = MarianMTModel.from_pretrained(directory).eval().to(device)
  src, valid = sources(batch, args.src)
  ids = torch.from_numpy(src.astype(np.int64)).to(device)
  mask = torch.from_numpy(valid.astype(np.int64)).to(device)
  memory = _loaded()

  def call():
    with torch.inference_mode():
      return model.generate(
        ids,
        attention_mask=mask,
        num_beams=args.beams,
        max_new_tokens=args.new,
        min_new_tokens=args.new,
        early_stopping=False,
        forced_eos_token_id=None,
        do_sample=False,
      )

  first, s, out = _timed(call, lambda x: x.cpu(), args.repeats)
  row = {'threads': torch.get_num_threads(), 'first_call_s': first, 's': s}
  row['tokens'] = out[:, 1:].numpy()  # after the start token
  if device == 'cuda':
    row['device_peak_MB'] = torch.cuda.max_memory_allocated() / 2**20
  return {**row, **_decoded(memory)}


def run_ours(directory: str, batch: int, args) -> dict:
  import jax

  from transformer_jax.convert import load_hf
  from transformer_jax.generation import translate

  model, params = load_hf(directory)
  params = jax.block_until_ready(jax.device_put(params))
  src, valid = sources(batch, args.src)
  memory = _loaded()

  def call():
    return translate(
      model,
      params,
      src,
      src_valid=valid,
      max_len=args.new,
      bos_id=PAD,
      eos_id=EOS,
      pad_id=PAD,
      beam_size=args.beams,
      early_stopping=False,
      min_new_tokens=args.new,
    )

  first, s, out = _timed(call, jax.block_until_ready, args.repeats)
  row = {'threads': len(os.sched_getaffinity(0)), 'first_call_s': first, 's': s}
  row['tokens'] = np.asarray(out)
  stats = jax.devices()[0].memory_stats() if jax.default_backend() == 'gpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    row['device_peak_MB'] = stats['peak_bytes_in_use'] / 2**20
  return {**row, **_decoded(memory)}


SIDES = {'ours': run_ours, 'transformers': run_hf}


def _spawn(side: str, directory: str, batch: int, args, threads: int | None = None) -> dict:
  """Runs one side in a fresh interpreter, so that its peak memory is its own."""
  with tempfile.NamedTemporaryFile(suffix='.json') as result:
    command = [sys.executable, '-m', 'benchmarks.decode_seq2seq', '--side', side]
    command += ['--dir', directory, '--batches', str(batch), '--result', result.name]
    command += ['--src', str(args.src), '--new', str(args.new)]
    command += ['--beams', str(args.beams), '--repeats', str(args.repeats)]
    command += ['--torch-threads', str(threads)] if threads else []
    subprocess.run(command, cwd=ROOT, check=True)
    with open(result.name) as f:
      row = json.load(f)
  row['tokens'] = np.asarray(row['tokens'])
  return row


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m benchmarks.decode --model marian',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--batches', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--src', type=int, default=32, help='source tokens (the longest row)')
  parser.add_argument('--new', type=int, default=32, help='generated tokens')
  parser.add_argument('--beams', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--torch-threads',
    type=int,
    nargs='+',
    help="the transformers side's thread counts, one run each (default: torch's own, and 1 on a CPU)",
  )
  parser.add_argument('--out', default='benchmarks/results/decode_marian.json')
  # internal: one side in its own process, its row written to --result
  parser.add_argument('--side', choices=sorted(SIDES), help=argparse.SUPPRESS)
  parser.add_argument('--dir', help=argparse.SUPPRESS)
  parser.add_argument('--result', help=argparse.SUPPRESS)
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.side:
    row = SIDES[args.side](args.dir, args.batches[0], args)
    with open(args.result, 'w') as f:
      json.dump({**row, 'tokens': row['tokens'].tolist()}, f)
    return

  from benchmarks.harness import machine_info, print_machine, print_table, write_json

  info = machine_info()
  print_machine(info)
  import torch

  # None: torch's own choice; on a CPU also one thread, which a shared machine often runs faster
  threads = args.torch_threads or ([None] if torch.cuda.is_available() else [None, 1])
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    save_model(directory)
    for batch in args.batches:
      theirs = [_spawn('transformers', directory, batch, args, n) for n in threads]
      ours = _spawn('ours', directory, batch, args)
      fastest = min(row['s'] for row in theirs)
      sides = [('transformers', row) for row in theirs] + [('jax', ours)]
      for i, (impl, side) in enumerate(sides):
        row = {'model': 'marian', 'batch': batch, 'beams': args.beams, 'impl': impl, **side}
        row['tokens_s'] = batch * args.new / row['s']
        row['ms_per_step'] = row['s'] / args.new * 1e3
        row['vs_transformers'] = fastest / row['s']
        tokens = row.pop('tokens')
        if i:  # against the first transformers run
          row['match'] = float(np.mean(tokens == theirs[0]['tokens']))
        rows.append(row)
        print(row, flush=True)
  print()
  columns = (
    'model batch beams impl threads first_call_s ms_per_step tokens_s vs_transformers match'.split()
  )
  columns += ['loaded_MB', 'resident_MB', 'decode_MB', 'peak_MB']
  if any('device_peak_MB' in r for r in rows):
    columns.append('device_peak_MB')
  print_table(rows, columns)
  write_json(args.out, 'decode_marian', info, vars(args), rows)


if __name__ == '__main__':
  main()
