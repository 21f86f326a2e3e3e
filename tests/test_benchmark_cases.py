"""The training benchmark's BERT case computes the same loss on both sides, whichever positions are predicted."""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import train_throughput
from transformer_jax.convert.bert import to_bert


@pytest.mark.parametrize('targets, predicted', [('masked', 3), ('all', 20)])
def test_bert_case_losses_agree(targets, predicted):
  args = argparse.Namespace(bert_layers=1, seq=20, batch=2, dropout=0.0, bert_targets=targets)
  small = dict(vocab_size=101, d_model=12, num_heads=3, d_ff=20)
  case = train_throughput.bert_case(args, small)
  assert case.batch['positions'].shape == case.batch['targets'].shape == (2, predicted)
  params = train_throughput.init_params(case)
  with jax.default_matmul_precision('highest'):
    ours = case.loss(
      functools.partial(case.model.apply, {'params': params}), jax.tree.map(jnp.asarray, case.batch)
    )
  hf = case.torch_model().eval()
  hf.load_state_dict(to_bert(case.model, params, as_torch=True))
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in case.batch.items()}
  with torch.no_grad():
    theirs = case.torch_loss(hf, batch)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
