"""``python -m benchmarks.decode`` end to end on the small shape with a tiny vocabulary: both sides decode the same
tokens, and each row's bandwidth bound is computed from the bandwidth measured in its own batch's rounds."""

import json

import pytest

from benchmarks import decode

pytestmark = pytest.mark.slow  # a full-width 6-layer model, and transformers' generate

IMPLS = [('jax', 'bfloat16'), ('jax', 'float32'), ('transformers', 'float32')]
NEW = 3


def test_rows_and_their_bound(tmp_path):
  out = tmp_path / 'decode.json'
  decode.main(
    [
      *('--shapes', 'small', '--batches', '1', '2', '--prompt', '5', '--new', str(NEW)),
      *('--vocab', '103', '--repeats', '1', '--pause', '0', '--out', str(out)),
    ]
  )
  rows = {(r['batch'], r['impl'], r['dtype']): r for r in json.loads(out.read_text())['rows']}
  assert sorted(rows) == [(batch, *impl) for batch in (1, 2) for impl in IMPLS]
  for batch in (1, 2):
    group = [rows[(batch, *impl)] for impl in IMPLS]
    assert rows[batch, 'jax', 'float32']['match'] == 1.0
    assert len({row['bandwidth_GBs'] for row in group}) == 1  # one probe in these rounds
    for row in group:
      bound = batch * row['bandwidth_GBs'] * 1e9 / (row['weights_MB'] * 1e6)
      assert row['bandwidth_GBs'] > 0
      assert row['bound_tokens_s'] == pytest.approx(bound)
      assert row['pct_of_bound'] == pytest.approx(100 * row['tokens_s'] / bound)
      assert row['tokens_s'] == pytest.approx(batch * NEW / row['s'])
  # bf16 weights: half the bytes of float32's
  assert rows[1, 'jax', 'bfloat16']['weights_MB'] == pytest.approx(
    rows[1, 'jax', 'float32']['weights_MB'] / 2
  )
