"""Run in a fresh process with 8 simulated CPU devices: forward and gradients under several meshes equal one device.

Prints one JSON line per (model, mesh) with the max differences and the parameter specs.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from transformer_jax import GPT, GPTConfig, Transformer, TransformerConfig  # noqa: E402
from transformer_jax.sharding import batch_sharding, make_mesh, param_shardings  # noqa: E402

# Widths the mesh axes divide (D=16 over 8 FSDP shards, 4 heads and 24 FFN units over 4 tensor shards), so every
# layout really splits the parameters.
TINY = dict(num_layers=2, d_model=16, num_heads=4, d_ff=24, max_len=16)
MESHES = {'data': (8, 1, 1), 'fsdp': (1, 8, 1), 'tensor': (1, 1, 4), 'fsdp_tensor': (1, 4, 2)}


def models(scan):
  src = jax.random.randint(jax.random.key(1), (8, 7), 1, 36).at[0, 4:].set(0)
  tgt = jax.random.randint(jax.random.key(2), (8, 5), 1, 44).at[1, 3:].set(0)
  ids = jax.random.randint(jax.random.key(3), (8, 5), 0, 40)
  yield 'transformer', Transformer(TransformerConfig(src_vocab_size=36, tgt_vocab_size=44, scan_layers=scan,
                                                     **TINY)), (src, tgt)
  yield 'gpt', GPT(GPTConfig(vocab_size=40, scan_layers=scan, **TINY)), (ids,)


def main():
  scan = 'scan' in sys.argv[1:]
  for name, model, args in models(scan):
    params = jax.jit(model.init)(jax.random.key(0), *args)['params']

    def loss(p, *a):  # logits come back as aux: one compile gives the forward pass and the gradients
      logits = model.apply({'params': p}, *a)
      return jnp.mean(logits ** 2), logits

    (_, ref_out), ref_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, *args)
    for mesh_name, sizes in MESHES.items():
      mesh = make_mesh(*sizes, devices=jax.devices()[:int(np.prod(sizes))])
      shardings = param_shardings(params, mesh)
      p = jax.device_put(params, shardings)
      a = jax.device_put(args, batch_sharding(mesh))
      step = jax.jit(jax.value_and_grad(loss, has_aux=True), out_shardings=((None, None), shardings))
      (_, out), grad = step(p, *a)
      grad_diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
      specs = {'/'.join(str(getattr(k, 'key', k)) for k in path): str(x.sharding.spec)
               for path, x in jax.tree_util.tree_leaves_with_path(p)}
      print(json.dumps({'model': name, 'mesh': mesh_name, 'out_diff': float(jnp.abs(out - ref_out).max()),
                        'grad_diff': grad_diff, 'specs': specs}), flush=True)


if __name__ == '__main__':
  main()
