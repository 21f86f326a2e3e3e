// Attention on the CPU in one pass per head: out = softmax(scale q k^T, masked) v, and its gradient.
//
// XLA:CPU computes attention as separate ops over the whole (B, H, T, S) logits: the product, the mask, the
// softmax's max, exponent, sum and division, each a pass over an array far larger than the cache, and as many again
// in the backward pass. The products themselves are a few percent of the work. Here one task takes one head (the
// forward) or one key/value head with its query heads (the backward) and walks its queries in blocks of kQueryBlock
// rows: a block's (rows, S) logits, probabilities and their gradient stay in cache from the product that makes them
// to the products that use them. Everything is computed in float32 (bfloat16 inputs are widened, outputs rounded).
//
// Layouts: q (B, T, H, K), k and v (B, S, G, K), G dividing H (query head h meets key/value head h / (H / G));
// mask uint8 (MB, MH, MT, S), each of MB, MH, MT 1 or the full size; logsumexp (B, H, T) float32, +inf for a row
// with no visible key, whose output and gradients are 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "bfloat16.h"
#include "pool_blocks.h"
#include "small_gemm.h"

namespace ffi = xla::ffi;
using transformer_jax::gemm;
using transformer_jax::kLanes;
using transformer_jax::narrow;
using transformer_jax::vec;
using transformer_jax::widen;

namespace {

constexpr int64_t kQueryBlock = 64;  // rows per block: (64, S) float32 logits are 64 KiB at S = 256
// At most this many query rows take forward_rows; and below kSharedWork multiply-adds it runs on the calling thread.
constexpr int64_t kFewRows = 4;
constexpr int64_t kSharedWork = int64_t{1} << 20;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Shape {
  int64_t batch, q_len, heads, kv_len, kv_heads, head_dim, mask_batch, mask_heads, mask_rows;
  float scale;

  int64_t group() const { return heads / kv_heads; }
  // offset of (b, t, h, 0) in a (B, T, H, K) array, and of (b, s, g, 0) in a (B, S, G, K) one
  int64_t q_at(int64_t b, int64_t t, int64_t h) const { return ((b * q_len + t) * heads + h) * head_dim; }
  int64_t kv_at(int64_t b, int64_t s, int64_t g) const { return ((b * kv_len + s) * kv_heads + g) * head_dim; }
  const uint8_t* visible_row(const uint8_t* mask, int64_t b, int64_t h, int64_t t) const {
    const int64_t mb = mask_batch == 1 ? 0 : b, mh = mask_heads == 1 ? 0 : h, mt = mask_rows == 1 ? 0 : t;
    return mask + ((mb * mask_heads + mh) * mask_rows + mt) * kv_len;
  }
};

// Rows [t0, t0 + rows) of head h as a (rows, K) float32 block times factor.
template <typename T>
void load_rows(const T* x, const Shape& d, int64_t b, int64_t t0, int64_t rows, int64_t h, float factor, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = x + d.q_at(b, t0 + r, h);
    for (int64_t k = 0; k < d.head_dim; ++k) out[r * d.head_dim + k] = factor * widen(src[k]);
  }
}

// Key/value head g of batch b as (S, K) float32 rows, and optionally their (K, S) transpose.
template <typename T>
void load_head(const T* x, const Shape& d, int64_t b, int64_t g, float* rows, float* columns) {
  const int64_t K = d.head_dim, S = d.kv_len;
  for (int64_t s = 0; s < S; ++s) {
    const T* src = x + d.kv_at(b, s, g);
    for (int64_t k = 0; k < K; ++k) rows[s * K + k] = widen(src[k]);
  }
  if (!columns) return;
  // 16 rows at a time, so that each column's writes fill whole cache lines (columns S floats apart share few sets)
  constexpr int64_t kStrip = 16;
  for (int64_t s0 = 0; s0 < S; s0 += kStrip) {
    const int64_t s1 = std::min(S, s0 + kStrip);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t s = s0; s < s1; ++s) columns[k * S + s] = rows[s * K + k];
    }
  }
}

// Sets the masked entries of x[0:n] to -inf (visible[j] == 0) and returns the largest visible one (-inf if none).
float mask_row(float* x, const uint8_t* visible, int64_t n) {
  typedef uint8_t bytes __attribute__((vector_size(kLanes)));
  const vec hidden = transformer_jax::splat(-kInf);
  vec top = hidden;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    bytes seen;
    std::memcpy(&seen, visible + j, sizeof(seen));
    const transformer_jax::ivec keep = __builtin_convertvector(seen, transformer_jax::ivec) != 0;
    const vec masked = keep ? transformer_jax::load(x + j) : hidden;
    transformer_jax::store(x + j, masked);
    top = top > masked ? top : masked;
  }
  float largest = -kInf;
  for (int64_t l = 0; l < kLanes; ++l) largest = std::max(largest, top[l]);
  for (; j < n; ++j) {
    x[j] = visible[j] ? x[j] : -kInf;
    largest = std::max(largest, x[j]);
  }
  return largest;
}

// x[0:n] = exp(x[0:n] - shift) (0 where x is -inf); returns their sum.
float exp_row(float* x, int64_t n, float shift) {
  vec total{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec e = transformer_jax::exp(transformer_jax::load(x + j) - shift);
    transformer_jax::store(x + j, e);
    total += e;
  }
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += total[l];
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// x[0:n] *= factor
void scale_row(float* x, int64_t n, float factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

// The columns [lo, hi) outside which every row t0 <= t < t0 + rows of head h is masked (a causal mask's future, a
// padding mask's padding), widened to whole vectors; lo == hi when nothing in the block is visible.
struct Span {
  int64_t lo, hi;
};
Span visible_span(const Shape& d, const uint8_t* mask, int64_t b, int64_t h, int64_t t0, int64_t rows) {
  int64_t lo = d.kv_len, hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* visible = d.visible_row(mask, b, h, t0 + r);
    int64_t first = 0, last = d.kv_len;
    while (first < d.kv_len && !visible[first]) ++first;
    if (first == d.kv_len) continue;  // a row with no visible key
    while (!visible[last - 1]) --last;
    lo = std::min(lo, first);
    hi = std::max(hi, last);
  }
  if (lo >= hi) return {0, 0};
  return {lo / kLanes * kLanes, std::min(d.kv_len, (hi + kLanes - 1) / kLanes * kLanes)};
}

template <typename T>
void forward_head(const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask, T* out, float* lse,
                  int64_t b, int64_t h) {
  const int64_t K = d.head_dim, S = d.kv_len, g = h / d.group();
  std::vector<float> key_rows(S * K), keys_t(K * S), values(S * K), queries(kQueryBlock * K),
      logits(kQueryBlock * S), result(kQueryBlock * K);
  load_head(k, d, b, g, key_rows.data(), keys_t.data());
  load_head(v, d, b, g, values.data(), nullptr);
  for (int64_t t0 = 0; t0 < d.q_len; t0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, d.q_len - t0);
    const auto [lo, hi] = visible_span(d, mask, b, h, t0, rows);
    const int64_t n = hi - lo;  // the block's logits are (rows, n), rows S apart
    load_rows(q, d, b, t0, rows, h, d.scale, queries.data());
    gemm(queries.data(), K, 1, keys_t.data() + lo, S, logits.data(), S, rows, n, K, false);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * S;
      const float top = n ? mask_row(row, d.visible_row(mask, b, h, t0 + r) + lo, n) : -kInf;
      float* lse_at = lse + (b * d.heads + h) * d.q_len + t0 + r;
      if (top == -kInf) {  // no visible key
        std::fill(row, row + n, 0.0f);
        *lse_at = kInf;
        continue;
      }
      const float sum = exp_row(row, n, top);
      scale_row(row, n, 1.0f / sum);
      *lse_at = top + std::log(sum);
    }
    if (n) {
      gemm(logits.data(), S, 1, values.data() + lo * K, K, result.data(), K, rows, K, n, false);
    } else {
      std::fill(result.begin(), result.end(), 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = out + d.q_at(b, t0 + r, h);
      for (int64_t c = 0; c < K; ++c) dst[c] = narrow<T>(result[r * K + c]);
    }
  }
}

// The forward for a few query rows (a decoding step): each row's logits are taken from the key rows where they lie,
// and its output summed from the value rows, with no (S, K) copies or transposes; those would cost more than the
// work itself at one row. `logits` holds S floats, `query` and `acc` K each.
template <typename T>
void forward_rows(const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask, T* out, float* lse,
                  int64_t b, int64_t h, float* logits, float* query, float* acc) {
  const int64_t K = d.head_dim, g = h / d.group();
  for (int64_t t = 0; t < d.q_len; ++t) {
    load_rows(q, d, b, t, 1, h, d.scale, query);
    const auto [lo, hi] = visible_span(d, mask, b, h, t, 1);
    const int64_t n = hi - lo;
    for (int64_t s = lo; s < hi; ++s) {
      const T* key = k + d.kv_at(b, s, g);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < K; ++c) sum += query[c] * widen(key[c]);
      logits[s - lo] = sum;
    }
    const float top = n ? mask_row(logits, d.visible_row(mask, b, h, t) + lo, n) : -kInf;
    float* lse_at = lse + (b * d.heads + h) * d.q_len + t;
    std::fill(acc, acc + K, 0.0f);
    if (top == -kInf) {  // no visible key
      *lse_at = kInf;
    } else {
      const float sum = exp_row(logits, n, top);
      *lse_at = top + std::log(sum);
      for (int64_t s = lo; s < hi; ++s) {
        const float p = logits[s - lo] / sum;
        const T* value = v + d.kv_at(b, s, g);
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) acc[c] += p * widen(value[c]);
      }
    }
    T* dst = out + d.q_at(b, t, h);
    for (int64_t c = 0; c < K; ++c) dst[c] = narrow<T>(acc[c]);
  }
}

// dq of the query heads of key/value head g, and that head's dk, dv (summed over its query heads).
template <typename T>
void backward_group(const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask, const T* out,
                    const float* lse, const T* dout, T* dq, T* dk, T* dv, int64_t b, int64_t g) {
  const int64_t K = d.head_dim, S = d.kv_len;
  std::vector<float> keys(S * K), keys_t(K * S), value_rows(S * K), values_t(K * S), dkeys(S * K, 0.0f),
      dvalues(S * K, 0.0f), queries(kQueryBlock * K), douts(kQueryBlock * K), outs(kQueryBlock * K),
      probs(kQueryBlock * S), dprobs(kQueryBlock * S), dqueries(kQueryBlock * K), row_dot(kQueryBlock);
  load_head(k, d, b, g, keys.data(), keys_t.data());
  load_head(v, d, b, g, value_rows.data(), values_t.data());
  for (int64_t h = g * d.group(); h < (g + 1) * d.group(); ++h) {
    for (int64_t t0 = 0; t0 < d.q_len; t0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, d.q_len - t0);
      load_rows(q, d, b, t0, rows, h, d.scale, queries.data());
      load_rows(dout, d, b, t0, rows, h, 1.0f, douts.data());
      load_rows(out, d, b, t0, rows, h, 1.0f, outs.data());
      const auto [lo, hi] = visible_span(d, mask, b, h, t0, rows);
      const int64_t n = hi - lo;  // the block's probabilities are (rows, n), rows S apart
      if (n == 0) {
        std::fill(dqueries.begin(), dqueries.end(), 0.0f);
      } else {
        gemm(queries.data(), K, 1, keys_t.data() + lo, S, probs.data(), S, rows, n, K, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = probs.data() + r * S;
          const float row_lse = lse[(b * d.heads + h) * d.q_len + t0 + r];
          if (row_lse == kInf) {
            std::fill(row, row + n, 0.0f);
          } else {
            mask_row(row, d.visible_row(mask, b, h, t0 + r) + lo, n);
            exp_row(row, n, row_lse);
          }
          // the softmax gradient's row term: sum_j p dp = sum_k out dout
          float sum = 0.0f;
          for (int64_t c = 0; c < K; ++c) sum += outs[r * K + c] * douts[r * K + c];
          row_dot[r] = sum;
        }
        // dv += p^T dout; dp = dout v^T; ds = p (dp - row_dot); dq = scale ds k; dk += ds^T (scale q)
        gemm(probs.data(), 1, S, douts.data(), K, dvalues.data() + lo * K, K, n, K, rows, true);
        gemm(douts.data(), K, 1, values_t.data() + lo, S, dprobs.data(), S, rows, n, K, false);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < n; ++j) dprobs[r * S + j] = probs[r * S + j] * (dprobs[r * S + j] - row_dot[r]);
        }
        gemm(dprobs.data(), S, 1, keys.data() + lo * K, K, dqueries.data(), K, rows, K, n, false);
        gemm(dprobs.data(), 1, S, queries.data(), K, dkeys.data() + lo * K, K, n, K, rows, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = dq + d.q_at(b, t0 + r, h);
        for (int64_t c = 0; c < K; ++c) dst[c] = narrow<T>(d.scale * dqueries[r * K + c]);
      }
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    T *dk_row = dk + d.kv_at(b, s, g), *dv_row = dv + d.kv_at(b, s, g);
    for (int64_t c = 0; c < K; ++c) {
      dk_row[c] = narrow<T>(dkeys[s * K + c]);
      dv_row[c] = narrow<T>(dvalues[s * K + c]);
    }
  }
}

ffi::Error shape_of(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer mask, float scale,
                    Shape* d) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 4 || v.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("attention takes 4-D q, k, v and mask");
  }
  *d = Shape{qd[0], qd[1], qd[2], kd[1], kd[2], qd[3], md[0], md[1], md[2], scale};
  if (kd[0] != d->batch || kd[3] != d->head_dim || d->kv_heads == 0 || d->heads % d->kv_heads != 0 ||
      md[3] != d->kv_len) {
    return ffi::Error::InvalidArgument("attention shapes disagree");
  }
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("attention takes q, k and v of one dtype");
  }
  return ffi::Error::Success();
}

template <typename T>
const T* as(ffi::AnyBuffer x) {
  return reinterpret_cast<const T*>(x.untyped_data());
}
template <typename T>
T* as(ffi::Result<ffi::AnyBuffer>& x) {
  return reinterpret_cast<T*>(x->untyped_data());
}

// run(float{}) or run(uint16_t{}) (bfloat16) as the element type says.
template <typename Run>
ffi::Error by_dtype(ffi::DataType type, Run run) {
  switch (type) {
    case ffi::DataType::F32: run(float{}); break;
    case ffi::DataType::BF16: run(uint16_t{}); break;
    default: return ffi::Error::InvalidArgument("attention takes float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer mask,
                   float scale, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse) {
  Shape d;
  if (auto error = shape_of(q, k, v, mask, scale, &d); error.failure()) return error;
  auto run = [&](auto type) {
    using T = decltype(type);
    if (d.q_len <= kFewRows) {
      auto heads = [&, d](int64_t first, int64_t last) {
        std::vector<float> logits(d.kv_len), query(d.head_dim), acc(d.head_dim);
        for (int64_t task = first; task < last; ++task) {
          forward_rows<T>(d, as<T>(q), as<T>(k), as<T>(v), as<uint8_t>(mask), as<T>(out), as<float>(lse),
                          task / d.heads, task % d.heads, logits.data(), query.data(), acc.data());
        }
      };
      const int64_t tasks = d.batch * d.heads;
      // a decoding step's few rows: on this thread unless there is enough work to share
      if (tasks * d.q_len * d.kv_len * d.head_dim < kSharedWork) return heads(0, tasks);
      return transformer_jax::run_blocks(pool, tasks, [&](int64_t task) { heads(task, task + 1); });
    }
    transformer_jax::run_blocks(pool, d.batch * d.heads, [&, d](int64_t task) {
      forward_head<T>(d, as<T>(q), as<T>(k), as<T>(v), as<uint8_t>(mask), as<T>(out),
                      as<float>(lse), task / d.heads, task % d.heads);
    });
  };
  return by_dtype(q.element_type(), run);
}

ffi::Error backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer mask,
                    ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer dout, float scale,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv) {
  Shape d;
  if (auto error = shape_of(q, k, v, mask, scale, &d); error.failure()) return error;
  auto run = [&](auto type) {
    using T = decltype(type);
    transformer_jax::run_blocks(pool, d.batch * d.kv_heads, [&, d](int64_t task) {
      backward_group<T>(d, as<T>(q), as<T>(k), as<T>(v), as<uint8_t>(mask), as<T>(out),
                        as<float>(lse), as<T>(dout), as<T>(dq), as<T>(dk),
                        as<T>(dv), task / d.kv_heads, task % d.kv_heads);
    });
  };
  return by_dtype(q.element_type(), run);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxAttentionForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxAttentionBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
