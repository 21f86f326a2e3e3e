"""``modules.dot`` and ``modules.dense`` with the CPU kernels (``transformer_jax.kernels``): each path equal to a
float64 or XLA product, used exactly where it applies, differentiable, and a clean fallback when it cannot be built."""

import itertools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import cpu_build, mkl_matmul, skinny_matmul, transpose
from transformer_jax.modules.dot import dense_product, dot_general, product_layout

pytestmark = pytest.mark.skipif(
  not skinny_matmul.available(), reason='no C++ compiler for the CPU kernel'
)

# K = 37 leaves a remainder after the kernel's four-row passes; N = 1,031 spans nine 128-row table blocks, the last
# partial. K = 301, N = 77: the (K, N) weight is cut into slices of K (partial sums added in order), each with a
# remainder.
SHAPES = [(37, 1031), (301, 77)]


def float64_product(x, w, transposed):
  w64 = np.asarray(w.astype(jnp.float32), np.float64)
  return np.asarray(x, np.float64) @ (w64.T if transposed else w64)


# (x's dtype, the weights' dtype): float32 rows by either weight dtype, and bf16 rows by bf16 weights (a bf16 model's
# decoding step: AVX512-BF16 pairs where the CPU has them, else x widened)
DTYPES = [('float32', 'float32'), ('float32', 'bfloat16'), ('bfloat16', 'bfloat16')]
DTYPE_IDS = ['f32_by_f32', 'f32_by_bf16', 'bf16_by_bf16']


@pytest.mark.parametrize('x_dtype, dtype', DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize('transposed', [False, True], ids=['kernel_KN', 'table_NK'])
@pytest.mark.parametrize('rows', [1, 3, 8])  # the kernel takes 8; dot_general sends it max_rows
@pytest.mark.parametrize('k, n', SHAPES)
def test_kernel_equals_float64_product(k, n, rows, transposed, x_dtype, dtype):
  assert_kernel_equals_float64_product(k, n, rows, transposed, dtype, seed=rows, x_dtype=x_dtype)


def assert_kernel_equals_float64_product(
  k, n, rows, transposed, dtype, seed, product=skinny_matmul.matmul, x_dtype='float32'
):
  """``product(x, w, transposed)`` (the kernel, or a build of it) against the float64 product."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (rows, k), x_dtype)
  w = jax.random.normal(kw, (n, k) if transposed else (k, n), dtype)
  out = jax.jit(product, static_argnums=2)(x, w, transposed)
  assert out.shape == (rows, n) and out.dtype == jnp.float32
  np.testing.assert_allclose(
    out,
    float64_product(x.astype(jnp.float32), w, transposed),
    rtol=1e-5,
    atol=1e-5,
    err_msg=f'{k}x{n}, {rows} rows, transposed={transposed}, {x_dtype} by {dtype}',
  )


@pytest.mark.parametrize('x_dtype, dtype', DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize('transposed', [False, True], ids=['kernel_KN', 'table_NK'])
def test_kernel_at_every_row_count(transposed, x_dtype, dtype):
  """The AVX-512 blocks are compiled once per row count (1 to 8): every count gets its own rows right. K = 37 and
  301 leave 5 and 1 weight rows after the bf16 pairs' passes of 8 (an odd last row paired with zeros)."""
  for rows in range(1, skinny_matmul.KERNEL_ROWS + 1):
    for k, n in SHAPES:
      assert_kernel_equals_float64_product(
        k, n, rows, transposed, dtype, 100 + rows, x_dtype=x_dtype
      )


def test_bf16_rows_by_bf16_weights_stay_bf16():
  """A bf16 model's few-row product hands the kernel its bf16 rows as they are (not a float32 copy), and gets the
  float32 product of the same values."""
  x = jax.random.normal(jax.random.key(0), (3, 40), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (40, 33), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  text = jax.jit(lambda x, w: dot_general(x, w, dims)).lower(x, w).compile().as_text()
  (call,) = [line for line in text.splitlines() if skinny_matmul.TARGET in line]
  assert 'operand_layout_constraints={bf16[3,40]{1,0}, bf16[40,33]{1,0}}' in call, call
  wide = skinny_matmul.matmul(x.astype(jnp.float32), w, False)
  np.testing.assert_allclose(skinny_matmul.matmul(x, w, False), wide, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
  not {'avx2', 'fma'} <= (cpu_build.cpu_flags() or set()), reason='needs an x86 CPU with AVX2'
)
def test_portable_blocks_built_without_avx512(monkeypatch, tmp_path):
  """The kernel built for AVX2 alone (``-march=x86-64-v3``), as on a CPU without AVX-512, where its portable loops
  run instead of skinny_avx512.h's blocks: equal to the float64 product for every pair of dtypes (bf16 rows widened)
  and both layouts."""
  flags = tuple('-march=x86-64-v3' if f == '-march=native' else f for f in cpu_build.FLAGS)
  monkeypatch.setattr(cpu_build, 'FLAGS', flags)
  monkeypatch.setenv('TRANSFORMER_JAX_CACHE', str(tmp_path))
  built = cpu_build.library.__wrapped__('skinny_matmul.cc')  # uncached: a build of its own
  assert built is not None
  target = 'transformer_jax_skinny_matmul_x86_64_v3'
  handler = jax.ffi.pycapsule(built.TransformerJaxSkinnyMatmul)
  jax.ffi.register_ffi_target(target, handler, platform='cpu')

  def portable(x, w, transposed):
    n = w.shape[0] if transposed else w.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x, w, transposed=transposed)

  for (k, n), rows, transposed, (x_dtype, dtype) in itertools.product(
    SHAPES, (1, 3, 8), (False, True), DTYPES
  ):
    assert_kernel_equals_float64_product(
      k, n, rows, transposed, dtype, rows, product=portable, x_dtype=x_dtype
    )


def test_products_from_several_threads_at_once():
  """The kernel's awake helpers take one product at a time; a product that finds them busy runs on XLA's pool. Four
  Python threads calling it at once all get their own, exact results."""
  import concurrent.futures

  product = jax.jit(skinny_matmul.matmul, static_argnums=2)
  cases = []
  for i, (k, n) in enumerate(SHAPES * 2):
    kx, kw = jax.random.split(jax.random.key(10 + i))
    x = jax.random.normal(kx, (2, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.bfloat16)
    want = np.asarray(product(x, w, False))
    np.testing.assert_allclose(want, float64_product(x, w, False), rtol=1e-5, atol=1e-5)
    cases.append((x, w, want))

  def repeat(case):
    x, w, want = case
    return all(np.array_equal(np.asarray(product(x, w, False)), want) for _ in range(50))

  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    assert all(pool.map(repeat, cases))


def custom_calls(fn, *args) -> int:
  """Kernel calls in the compiled program of ``fn`` (a fresh trace: ``jit`` caches by function)."""
  compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile().as_text()
  return compiled.count(f'custom_call_target="{skinny_matmul.TARGET}"')


def test_dense_general_shapes_use_the_kernel_and_keep_dtype():
  """A fused-QKV kernel ``(D, 3, H, K)`` and an output projection contracting ``(H, K)``, in bf16."""
  x = jax.random.normal(jax.random.key(0), (2, 1, 12), jnp.bfloat16)  # (B, T, D), 2 rows
  qkv = jax.random.normal(jax.random.key(1), (12, 3, 2, 5), jnp.bfloat16)
  heads = jax.random.normal(jax.random.key(2), (2, 1, 2, 5), jnp.bfloat16)  # (B, T, H, K)
  out_proj = jax.random.normal(jax.random.key(3), (2, 5, 12), jnp.bfloat16)
  cases = [
    (x, qkv, (((2,), (0,)), ((), ())), 'btd,dchk->btchk'),
    (heads, out_proj, (((2, 3), (0, 1)), ((), ())), 'bthk,hkd->btd'),
  ]
  for lhs, rhs, dims, spec in cases:
    fn = lambda a, b, dims=dims: dot_general(a, b, dims)  # noqa: E731
    assert custom_calls(fn, lhs, rhs) == 1
    out = jax.jit(fn)(lhs, rhs)
    want = jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.bfloat16 and out.shape == want.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), want.astype(jnp.bfloat16), rtol=1e-2)


@pytest.mark.parametrize(
  'lhs_shape, rhs_shape, dims, why',
  [
    ((3, 3, 7), (7, 5), (((2,), (0,)), ((), ())), 'more rows than the kernel takes'),
    ((2, 1, 7), (2, 7, 5), (((2,), (1,)), ((0,), (0,))), 'a batch dimension'),
    ((2, 7), (5, 7, 3), (((1,), (1,)), ((), ())), 'a middle contracting dimension'),
    (
      (7, 2),
      (7, 5),
      (((0,), (0,)), ((), ())),
      'the left operand contracting its leading dimension',
    ),
  ],
)
def test_other_products_stay_with_xla(lhs_shape, rhs_shape, dims, why):
  lhs, rhs = jnp.ones(lhs_shape), jnp.ones(rhs_shape)
  assert custom_calls(lambda a, b: dot_general(a, b, dims), lhs, rhs) == 0, why
  want = jax.lax.dot_general(lhs, rhs, dims)
  np.testing.assert_array_equal(dot_general(lhs, rhs, dims), want)


@pytest.mark.parametrize(
  'avx512, bf16_dots, float32_rows, bf16_rows',
  [(True, True, 8, 8), (True, False, 8, 8), (False, False, 4, 8), (False, True, 4, 4)],
  ids=['avx512_bf16', 'avx512_only', 'avx2', 'bf16_dots_without_avx512'],
)
def test_row_limit_follows_the_cpu(avx512, bf16_dots, float32_rows, bf16_rows, monkeypatch):
  """Seven rows go to the kernel where it runs its AVX-512 blocks, and for bf16 weights on a CPU without bf16 dot
  instructions, where XLA emulates its bf16 products; elsewhere the limit is four rows."""
  monkeypatch.setattr(skinny_matmul, 'cpu_has_avx512', lambda: avx512)
  monkeypatch.setattr(skinny_matmul, 'cpu_has_bf16_dots', lambda: bf16_dots)
  assert skinny_matmul.max_rows(jnp.float32) == float32_rows
  assert skinny_matmul.max_rows(jnp.bfloat16) == bf16_rows
  dims = (((1,), (0,)), ((), ()))
  x = jax.random.normal(jax.random.key(0), (7, 37))
  w = jax.random.normal(jax.random.key(1), (37, 1031), jnp.bfloat16)
  fn = lambda a, b: dot_general(a, b, dims)  # noqa: E731
  assert custom_calls(fn, x, w) == (bf16_rows >= 7)
  assert custom_calls(fn, x, w.astype(jnp.float32)) == (float32_rows >= 7)
  np.testing.assert_allclose(jax.jit(fn)(x, w), float64_product(x, w, False), rtol=1e-5, atol=1e-4)


def test_cpu_flags_read():
  flags = cpu_build.cpu_flags()
  if flags is None:
    pytest.skip('no /proc/cpuinfo flags on this machine')
  assert skinny_matmul.cpu_has_bf16_dots() == bool(flags & set(skinny_matmul.BF16_DOT_FLAGS))
  assert skinny_matmul.cpu_has_avx512() == ('avx512f' in flags)


def test_layouts_found():
  assert product_layout((1, 1, 8), (8, 3, 4), (((2,), (0,)), ((), ()))) == (1, 8, False)
  assert product_layout((2, 8), (50, 8), (((1,), (1,)), ((), ()))) == (2, 8, True)
  assert product_layout((0, 8), (8, 3), (((1,), (0,)), ((), ()))) is None


def test_gradients_and_vmap_equal_xla():
  dims = (((2,), (0,)), ((), ()))
  x = jax.random.normal(jax.random.key(0), (2, 2, 7))  # 4 rows
  w = jax.random.normal(jax.random.key(1), (7, 5))
  assert custom_calls(lambda x, w: dot_general(x, w, dims), x, w) == 1

  def loss(dot):
    return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims, precision='highest')))

  with jax.default_matmul_precision('highest'):
    ours = jax.grad(loss(dot_general), (0, 1))(x, w)
    want = jax.grad(loss(jax.lax.dot_general), (0, 1))(x, w)
    for a, b in zip(ours, want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    per_row = jax.vmap(lambda r: dot_general(r, w, (((1,), (0,)), ((), ()))))(x)
    np.testing.assert_allclose(per_row, jnp.einsum('btk,kn->btn', x, w), rtol=1e-5, atol=1e-6)


def test_switched_off_or_unbuildable_falls_back(monkeypatch, tmp_path, caplog):
  build = cpu_build.library.__wrapped__  # uncached
  monkeypatch.setenv('TRANSFORMER_JAX_CPU_KERNELS', '0')
  assert build('skinny_matmul.cc') is None
  monkeypatch.setenv('TRANSFORMER_JAX_CPU_KERNELS', '1')
  monkeypatch.setenv('TRANSFORMER_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  with caplog.at_level(logging.WARNING):
    assert build('skinny_matmul.cc') is None
  assert 'using XLA' in caplog.text and len(caplog.records) == 1
  assert not list((tmp_path / 'kernels').glob('*')), 'a failed build leaves no file behind'


@pytest.mark.parametrize('tie', [True, False], ids=['tied_head', 'own_head'])
def test_bf16_gpt_equals_xla(tie, monkeypatch):
  """A bfloat16 GPT over 4 tokens (4 rows: every projection and the head go through the kernel) against the same
  model with the kernel switched off: the same logits up to bf16 rounding of the activations."""
  from transformer_jax import GPT, GPTConfig

  cfg = GPTConfig(
    num_layers=2, d_model=12, num_heads=3, d_ff=20, vocab_size=37, max_len=8, dropout_rate=0.0,
    attention_dropout_rate=0.0, tie_output=tie, dtype='bfloat16', param_dtype='bfloat16',
  )  # fmt: skip
  model = GPT(cfg)
  ids = jnp.array([[3, 1, 4, 1]])
  params = model.init(jax.random.key(0), ids)['params']
  forward = lambda params: model.apply({'params': params}, ids)  # noqa: E731

  # per layer the fused query/key/value kernel, the output projection, fc_in and fc_out; then the head
  assert custom_calls(forward, params) == 4 * cfg.num_layers + 1
  ours = jax.jit(lambda p: forward(p))(params)
  monkeypatch.setattr(skinny_matmul, 'available', lambda: False)
  assert custom_calls(forward, params) == 0
  want = jax.jit(lambda p: forward(p))(params)
  assert ours.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(ours, want, rtol=0.05, atol=0.02)
  assert (ours.argmax(-1) == want.argmax(-1)).all()


def test_bf16_products_ask_for_float32_results():
  """Many-row bf16 products, forward and both gradients, are bf16 x bf16 with a float32 result rounded to bf16 (the
  form XLA:CPU's YNNPACK runs), and equal XLA's bf16 product up to bf16 rounding."""
  dims = (((2,), (0,)), ((), ()))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.bfloat16)  # 10 rows
  w = jax.random.normal(jax.random.key(1), (16, 24), jnp.bfloat16)

  def loss(dot):
    return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims).astype(jnp.float32)))

  grad = jax.grad(loss(dot_general), (0, 1))
  lowered = (
    jax.jit(grad).lower(x, w).as_text()
  )  # the CPU program: platform_dependent keeps its CPU branch
  products = [line for line in lowered.splitlines() if 'stablehlo.dot_general' in line]
  assert len(products) == 3  # forward, d/dx, d/dw
  for line in products:
    operands, result = line.rsplit(':', 1)[1].split('->')
    assert operands.count('bf16>') == 2 and result.strip().endswith('xf32>'), line
  ours = grad(x, w)
  want = jax.grad(loss(jax.lax.dot_general), (0, 1))(x, w)
  for a, b in zip(ours, want):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
# (517, 1030) spans two 512 x 512 blocks each way, with partial register tiles (16 x 8 and 8 x 8) on both edges.
@pytest.mark.parametrize('shape', [(37, 1031), (1, 5), (64, 33), (517, 1030)])
def test_transpose_kernel(shape, dtype):
  assert transpose.available()
  x = jax.random.normal(jax.random.key(0), shape, dtype)
  np.testing.assert_array_equal(jax.jit(transpose.transpose)(x), x.T)
  tangent = jax.jvp(transpose.transpose, (x,), (x * 2,))[1]
  np.testing.assert_array_equal(tangent, (x * 2).T)


@pytest.mark.parametrize(
  'x_shape, w_shape, dims, transposes',
  [
    ((64, 48), (48, 40), (((1,), (0,)), ((), ())), 1),  # x^T g with x transposed
    (
      (64, 200),
      (200, 8),
      (((1,), (0,)), ((), ())),
      2,
    ),  # x is the wide one: (g^T x)^T, g and the result
    (
      (64, 16),
      (300, 16),
      (((1,), (1,)), ((), ())),
      2,
    ),  # a tied head's g^T x: x and the result, not g
  ],
  ids=['transpose_x', 'transpose_g_and_result', 'tied_head'],
)
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_weight_gradient_transposes_the_smaller_operand(
  x_shape, w_shape, dims, transposes, dtype, monkeypatch
):
  """With one operand transposed by the kernel (the cheaper way round), the compiled weight gradient of a bf16 or
  float32 product is a plain dot of that dtype (bf16: not a float32 one over widened operands), equal to the float64
  product rounded to the dtype. (oneDNN, where it takes bf16 products, reads the operand transposed in place:
  tests/test_onednn_matmul.py.)"""
  # 64 rows: below mkl_matmul.MIN_ROWS, so MKL's path never takes the float32 product, even on Intel
  assert x_shape[0] < mkl_matmul.MIN_ROWS
  monkeypatch.setenv('TRANSFORMER_JAX_ONEDNN', '0')
  x = jax.random.normal(jax.random.key(0), x_shape, dtype)
  w = jax.random.normal(jax.random.key(1), w_shape, dtype)
  g = jax.random.normal(
    jax.random.key(2), (x_shape[0], w_shape[0] if dims[0][1] == (1,) else w_shape[1])
  )
  g = g.astype(dtype)
  dw = jax.jit(jax.grad(lambda w, x, g: jnp.sum(dot_general(x, w, dims).astype(jnp.float32) * g)))
  compiled = dw.lower(w, x, g).compile().as_text()
  assert compiled.count(f'custom_call_target="{transpose.TARGET}"') == transposes
  assert not re.search(r'f32\[\d+,\d+\]\{[^}]*\} convert', compiled), (
    'an operand widened to float32'
  )
  x64, g64 = (np.asarray(a, np.float64) for a in (x, g))
  expected = x64.T @ g64 if dims[0][1] == (0,) else g64.T @ x64
  assert dw(w, x, g).dtype == dtype
  rtol = 8e-3 if dtype == 'bfloat16' else 1e-5
  np.testing.assert_allclose(np.asarray(dw(w, x, g), np.float32), expected, rtol=rtol, atol=1e-5)


def test_bf16_einsum_is_bf16_in_both_passes():
  """Attention's two products in bf16: float32 results from bf16 operands forward and backward, values and
  gradients equal to ``jnp.einsum``'s up to bf16 rounding."""
  from transformer_jax.modules import dot

  spec = 'BTGQK,BSGK->BGQTS'
  q = jax.random.normal(jax.random.key(0), (2, 5, 3, 1, 8), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (2, 7, 3, 8), jnp.bfloat16)
  loss = lambda fn: lambda q, k: jnp.sum(jnp.sin(fn(q, k)))  # noqa: E731
  ours = lambda q, k: dot.einsum(spec, q, k, jnp.float32)  # noqa: E731
  plain = lambda q, k: jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)  # noqa: E731
  lowered = jax.jit(jax.grad(loss(ours), (0, 1))).lower(q, k).as_text()
  products = [line for line in lowered.splitlines() if 'stablehlo.dot_general' in line]
  assert len(products) == 3
  for line in products:
    operands, result = line.rsplit(':', 1)[1].split('->')
    assert operands.count('bf16>') == 2 and result.strip().endswith('xf32>'), line
  np.testing.assert_allclose(ours(q, k), plain(q, k), rtol=1e-6)
  for a, b in zip(jax.grad(loss(ours), (0, 1))(q, k), jax.grad(loss(plain), (0, 1))(q, k)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dense_layers_equal_flax(dtype):
  """Our ``Dense`` / ``DenseGeneral``: Flax's parameters (names, shapes, the same initial values), and outputs and
  gradients (the bias's in bf16 summed by the kernel) equal to Flax's layer in float32 on the same numbers."""
  import flax.linen as nn

  from transformer_jax.modules.dense import Dense, DenseGeneral

  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4), dtype)  # (B, T, H, K): 10 rows
  bias_init = nn.initializers.normal(1.0)
  pairs = [
    (Dense(7, dtype=dtype, bias_init=bias_init), nn.Dense(7, bias_init=bias_init)),
    (
      DenseGeneral((2, 3), axis=(-2, -1), dtype=dtype, bias_init=bias_init),
      nn.DenseGeneral((2, 3), axis=(-2, -1), bias_init=bias_init),
    ),
  ]
  f32 = lambda t: np.asarray(t, np.float32)  # noqa: E731
  tol = dict(rtol=2e-2, atol=5e-2) if dtype == 'bfloat16' else dict(rtol=1e-5, atol=1e-5)

  def close(a, b):
    np.testing.assert_allclose(f32(a), f32(b), **tol)

  x32 = x.astype(jnp.float32)
  for ours, flax_f32 in pairs:
    params = ours.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, flax_f32.init(jax.random.key(1), x32))
    close(ours.apply(params, x), flax_f32.apply(params, x32))
    # a linear loss: bf16 rounding of the outputs does not move the gradients (a nonlinear one would amplify it)
    weights = jax.random.normal(jax.random.key(2), flax_f32.apply(params, x32).shape)
    loss = lambda p, m, x, w=weights: jnp.sum(m.apply(p, x).astype(jnp.float32) * w)  # noqa: E731
    jax.tree.map(close, jax.grad(loss)(params, ours, x), jax.grad(loss)(params, flax_f32, x32))
  with pytest.raises(ValueError, match='batch_dims'):
    DenseGeneral(3, batch_dims=(0,)).init(jax.random.key(0), x)


def test_float32_layer_reads_bf16_weights_as_stored():
  """bf16 weights in a float32 layer: a decoding row's product reads them as bf16 (no float32 copy), with Flax's
  numbers (the kernel widens each weight exactly)."""
  import flax.linen as nn

  from transformer_jax.modules.dense import Dense

  x = jax.random.normal(jax.random.key(0), (1, 12))
  ours = Dense(7, dtype='float32', param_dtype='bfloat16')
  params = ours.init(jax.random.key(1), x)
  compiled = jax.jit(ours.apply).lower(params, x).compile().as_text()
  calls = [line for line in compiled.splitlines() if skinny_matmul.TARGET in line]
  assert len(calls) == 1 and 'bf16[12,7]' in calls[0]
  flax_layer = nn.Dense(7, dtype='float32', param_dtype='bfloat16')
  np.testing.assert_allclose(
    ours.apply(params, x), flax_layer.apply(params, x), rtol=1e-6, atol=1e-6
  )


def test_bf16_gradient_kernels_only_on_a_sole_cpu_device(monkeypatch):
  """A bf16 dense layer's weight and bias gradients use the transpose and few-row kernels on a lone CPU device; where
  the CPU is one of several devices (a mesh, whose partitioner cannot split a custom call) they are XLA's ops alone,
  with the same numbers up to bf16 rounding."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.bfloat16)  # 10 rows
  w = jax.random.normal(jax.random.key(1), (16, 24), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (24,), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  loss = lambda w, b: jnp.sum(jnp.sin(dense_product(x, w, b, dims).astype(jnp.float32)))  # noqa: E731

  def gradients():
    grad = jax.jit(jax.grad(loss, (0, 1)))
    return grad.lower(w, b).compile().as_text(), grad(w, b)

  text, kernels = gradients()
  assert f'custom_call_target="{transpose.TARGET}"' in text
  assert f'custom_call_target="{skinny_matmul.TARGET}"' in text
  monkeypatch.setattr(cpu_build, 'sole_cpu_device', lambda: False)
  text, plain = gradients()
  assert 'custom_call_target="transformer_jax' not in text
  for a, b in zip(kernels, plain, strict=True):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2
    )
