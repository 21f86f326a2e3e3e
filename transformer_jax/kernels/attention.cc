// Attention on the CPU in one pass per head: out = softmax(scale q k^T, masked) v, and its gradient.
//
// XLA:CPU computes attention as separate ops over the whole (B, H, T, S) logits: the product, the mask, the
// softmax's max, exponent, sum and division, each a pass over an array far larger than the cache, and as many again
// in the backward pass. The products themselves are a few percent of the work. Here one task takes one head (the
// forward) or one key/value head with its query heads (the backward) and walks its queries in blocks of kQueryBlock
// rows: a block's (rows, S) logits, probabilities and their gradient stay in cache from the product that makes them
// to the products that use them. The softmax is float32, and so is every sum. The products come in two kinds
// (attention_products.h): float32 ones, and on a CPU with AVX512-BF16 for bfloat16 inputs, bfloat16 pairs with the
// softmax's weights and their gradient rounded to bfloat16 first (attention_pairs.h), twice as fast.
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
#include "attention_pairs.h"
#include "attention_products.h"
#include "bfloat16.h"
#include "float_buffers.h"
#include "pool_blocks.h"
#include "small_gemm.h"

namespace ffi = xla::ffi;
using transformer_jax::as;
using transformer_jax::by_dtype;
using transformer_jax::kLanes;
using transformer_jax::kQueryBlock;
using transformer_jax::load_rows;
using transformer_jax::narrow;
using transformer_jax::ProductsFor;
using transformer_jax::Scratch;
using transformer_jax::Shape;
using transformer_jax::vec;
using transformer_jax::widen;

namespace {

// At most this many query rows take forward_rows. Its keys are cut into parts of at least kPartWork multiply-adds
// (H x keys x K) a row, which share the pool; a shorter span runs on the calling thread, where waking a pool thread
// would cost more than the part.
constexpr int64_t kFewRows = 4;
constexpr int64_t kPartWork = int64_t{1} << 17;
constexpr float kInf = std::numeric_limits<float>::infinity();

// kLanes mask bytes as 32-bit lanes, widened by one instruction (vpmovzxbd): a vector conversion of the bytes
// compiles to a byte-at-a-time unpacking, which cost more than the softmax's exponentials.
transformer_jax::ivec widen_bytes(const uint8_t* bytes) {
#if defined(__AVX512F__)
  return transformer_jax::ivec(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#else
  return transformer_jax::ivec(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
#endif
}

// Sets the masked entries of x[0:n] to -inf (visible[j] == 0) and returns the largest visible one (-inf if none).
float mask_row(float* x, const uint8_t* visible, int64_t n) {
  const vec hidden = transformer_jax::splat(-kInf);
  vec top = hidden;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec masked = widen_bytes(visible + j) != 0 ? transformer_jax::load(x + j) : hidden;
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

// The first nonzero of row[0:n] (n if none), and one past the last (given one), 8 bytes at a time: a causal row is
// mostly masked bytes to skip, and there is one such scan per query row.
int64_t first_visible(const uint8_t* row, int64_t n) {
  int64_t j = 0;
  for (uint64_t word; j + 8 <= n; j += 8) {
    std::memcpy(&word, row + j, 8);
    if (word) return j + __builtin_ctzll(word) / 8;  // little-endian: the lowest set byte comes first
  }
  while (j < n && !row[j]) ++j;
  return j;
}
int64_t end_of_visible(const uint8_t* row, int64_t n) {
  int64_t j = n;
  for (uint64_t word; j >= 8; j -= 8) {
    std::memcpy(&word, row + j - 8, 8);
    if (word) return j - __builtin_clzll(word) / 8;
  }
  while (!row[j - 1]) --j;
  return j;
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
    const int64_t first = first_visible(visible, d.kv_len);
    if (first == d.kv_len) continue;  // a row with no visible key
    const int64_t last = end_of_visible(visible, d.kv_len);
    lo = std::min(lo, first);
    hi = std::max(hi, last);
  }
  if (lo >= hi) return {0, 0};
  return {lo / kLanes * kLanes, std::min(d.kv_len, (hi + kLanes - 1) / kLanes * kLanes)};
}

template <typename T>
void forward_head(const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask, T* out, float* lse,
                  int64_t b, int64_t h) {
  const int64_t K = d.head_dim, S = d.kv_len;
  typename ProductsFor<T>::Forward products(d, k, v, b, h / d.group());
  Scratch<3> scratch({kQueryBlock * S, kQueryBlock * K, kQueryBlock});
  const auto [logits, result, row_sums] = scratch.pieces;
  for (int64_t t0 = 0; t0 < d.q_len; t0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, d.q_len - t0);
    const auto [lo, hi] = visible_span(d, mask, b, h, t0, rows);
    const int64_t n = hi - lo;  // the block's logits are (rows, n), rows S apart
    products.queries(q, b, t0, rows, h);
    products.logits(lo, n, logits);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits + r * S;
      const float top = n ? mask_row(row, d.visible_row(mask, b, h, t0 + r) + lo, n) : -kInf;
      float* lse_at = lse + (b * d.heads + h) * d.q_len + t0 + r;
      if (top == -kInf) {  // no visible key
        std::fill(row, row + n, 0.0f);
        *lse_at = kInf;
        row_sums[r] = 1.0f;
        continue;
      }
      row_sums[r] = exp_row(row, n, top);
      *lse_at = top + std::log(row_sums[r]);
    }
    // the product with unnormalised exponentials, each output row divided by its sum after: K divisions a row
    // where normalising the probabilities took n
    if (n) {
      products.weighted_values(logits, lo, n, result);
    } else {
      std::fill(result, result + rows * K, 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inverse = 1.0f / row_sums[r];
      T* dst = out + d.q_at(b, t0 + r, h);
      for (int64_t c = 0; c < K; ++c) dst[c] = narrow<T>(inverse * result[r * K + c]);
    }
  }
}

// The forward for a few query rows (a decoding step), one query row (b, t) with all its heads at a time. The keys and
// values are read where they lie, each (G, K) row of the cache once and in order for all the heads that use it: a
// cache walked head by head is read K values out of each row of G x K, which the prefetchers follow badly. A long
// span of keys is cut into parts that run on the pool's threads, each part's softmax kept relative to its own
// maximum and the parts' sums rescaled to the largest maximum when they are added (as split-K decoding does).
struct RowPart {
  int64_t row, lo, hi;  // query row index b * T + t, and the keys [lo, hi) of this part
};

// One part: per head h its largest visible logit top[h] (-inf if none), sum[h] = sum_s exp(logit - top[h]) and
// acc[h * K:(h + 1) * K] = sum_s exp(logit - top[h]) v_s.
template <typename T>
void forward_part(const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask, const RowPart& part,
                  float* top, float* sum, float* acc) {
  const int64_t H = d.heads, K = d.head_dim, n = part.hi - part.lo, b = part.row / d.q_len, t = part.row % d.q_len;
  Scratch<2> scratch({H * K, H * n});
  auto [queries, logits] = scratch.pieces;
  for (int64_t h = 0; h < H; ++h) load_rows(q, d, b, t, 1, h, d.scale, queries + h * K);
  for (int64_t s = part.lo; s < part.hi; ++s) {
    const T* keys = k + d.kv_at(b, s, 0);  // the (G, K) row
    for (int64_t h = 0; h < H; ++h) {
      const T* key = keys + (h / d.group()) * K;
      const float* query = queries + h * K;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < K; ++c) dot += query[c] * widen(key[c]);
      logits[h * n + s - part.lo] = dot;
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* row = logits + h * n;
    top[h] = mask_row(row, d.visible_row(mask, b, h, t) + part.lo, n);
    if (top[h] == -kInf) {  // no visible key here: no weight for the values
      std::fill(row, row + n, 0.0f);
      sum[h] = 0.0f;
    } else {
      sum[h] = exp_row(row, n, top[h]);
    }
  }
  std::fill(acc, acc + H * K, 0.0f);
  for (int64_t s = part.lo; s < part.hi; ++s) {
    const T* values = v + d.kv_at(b, s, 0);
    for (int64_t h = 0; h < H; ++h) {
      const float p = logits[h * n + s - part.lo];
      if (p == 0.0f) continue;  // masked (exp of -inf), or a head with no visible key
      const T* value = values + (h / d.group()) * K;
      float* out = acc + h * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) out[c] += p * widen(value[c]);
    }
  }
}

template <typename T>
void forward_rows(xla::ffi::ThreadPool& pool, const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask,
                  T* out, float* lse) {
  const int64_t H = d.heads, K = d.head_dim, rows = d.batch * d.q_len;
  // the keys any head of each row sees, and the parts they are cut into
  std::vector<RowPart> parts;
  std::vector<int64_t> first_part(rows + 1);
  bool shared = false;  // some row is long enough to cut
  for (int64_t row = 0; row < rows; ++row) {
    first_part[row] = static_cast<int64_t>(parts.size());
    int64_t lo = d.kv_len, hi = 0;
    for (int64_t h = 0; h < (d.mask_heads == 1 ? 1 : H); ++h) {
      const Span span = visible_span(d, mask, row / d.q_len, h, row % d.q_len, 1);
      if (span.lo < span.hi) lo = std::min(lo, span.lo), hi = std::max(hi, span.hi);
    }
    if (lo >= hi) continue;  // no visible key for any head
    const int64_t work = H * (hi - lo) * K, count = std::clamp<int64_t>(work / kPartWork, 1, pool.num_threads() + 1);
    shared = shared || count > 1;
    for (int64_t c = 0; c < count; ++c) {
      // part boundaries on whole vectors, so that only the span's own ends are partial
      const int64_t vectors = (hi - lo + kLanes - 1) / kLanes;
      const int64_t from = lo + vectors * c / count * kLanes;
      const int64_t to = std::min(hi, lo + vectors * (c + 1) / count * kLanes);
      if (from < to) parts.push_back({row, from, to});
    }
  }
  first_part[rows] = static_cast<int64_t>(parts.size());
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<float> tops(P * H), sums(P * H), accs(P * H * K);
  auto run = [&](int64_t i) {
    forward_part<T>(d, q, k, v, mask, parts[i], tops.data() + i * H, sums.data() + i * H, accs.data() + i * H * K);
  };
  if (shared) {
    transformer_jax::run_blocks(pool, P, run);
  } else {
    for (int64_t i = 0; i < P; ++i) run(i);
  }
  // each head's parts rescaled to their largest maximum, added, normalised
  std::vector<float> result(K);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / d.q_len, t = row % d.q_len;
    for (int64_t h = 0; h < H; ++h) {
      float largest = -kInf;
      for (int64_t i = first_part[row]; i < first_part[row + 1]; ++i) largest = std::max(largest, tops[i * H + h]);
      float total = 0.0f;
      std::fill(result.begin(), result.end(), 0.0f);
      if (largest != -kInf) {
        for (int64_t i = first_part[row]; i < first_part[row + 1]; ++i) {
          if (tops[i * H + h] == -kInf) continue;
          const float scale = std::exp(tops[i * H + h] - largest);
          total += scale * sums[i * H + h];
          const float* acc = accs.data() + (i * H + h) * K;
          for (int64_t c = 0; c < K; ++c) result[c] += scale * acc[c];
        }
      }
      lse[(b * H + h) * d.q_len + t] = largest == -kInf ? kInf : largest + std::log(total);
      const float inverse = largest == -kInf ? 0.0f : 1.0f / total;
      T* dst = out + d.q_at(b, t, h);
      for (int64_t c = 0; c < K; ++c) dst[c] = narrow<T>(inverse * result[c]);
    }
  }
}

// dq of the query heads of key/value head g, and that head's dk, dv (summed over its query heads).
template <typename T>
void backward_group(const Shape& d, const T* q, const T* k, const T* v, const uint8_t* mask, const T* out,
                    const float* lse, const T* dout, T* dq, T* dk, T* dv, int64_t b, int64_t g) {
  const int64_t K = d.head_dim, S = d.kv_len;
  typename ProductsFor<T>::Backward products(d, k, v, b, g);
  Scratch<4> scratch({kQueryBlock * S, kQueryBlock * S, kQueryBlock * K, kQueryBlock});
  const auto [probs, dprobs, dqueries, row_dot] = scratch.pieces;
  for (int64_t h = g * d.group(); h < (g + 1) * d.group(); ++h) {
    for (int64_t t0 = 0; t0 < d.q_len; t0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, d.q_len - t0);
      const auto [lo, hi] = visible_span(d, mask, b, h, t0, rows);
      const int64_t n = hi - lo;  // the block's probabilities are (rows, n), rows S apart
      if (n == 0) {
        std::fill(dqueries, dqueries + rows * K, 0.0f);
      } else {
        // the softmax gradient's row term: sum_j p dp = sum_k out dout. The block's rows of `out` are fetched
        // first, to arrive while the layouts are made; read between two rows' softmaxes, each waited out its misses.
        for (int64_t r = 0; r < rows; ++r) {
          const char* out_row = reinterpret_cast<const char*>(out + d.q_at(b, t0 + r, h));
          for (int64_t at = 0; at < K * int64_t(sizeof(T)); at += 64) __builtin_prefetch(out_row + at);
        }
        products.block(q, dout, b, t0, rows, h);
        for (int64_t r = 0; r < rows; ++r) {
          const T *out_row = out + d.q_at(b, t0 + r, h), *dout_row = dout + d.q_at(b, t0 + r, h);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < K; ++c) sum += widen(out_row[c]) * widen(dout_row[c]);
          row_dot[r] = sum;
        }
        products.logits(lo, n, probs);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = probs + r * S;
          const float row_lse = lse[(b * d.heads + h) * d.q_len + t0 + r];
          if (row_lse == kInf) {
            std::fill(row, row + n, 0.0f);
          } else {
            mask_row(row, d.visible_row(mask, b, h, t0 + r) + lo, n);
            exp_row(row, n, row_lse);
          }
        }
        // dv += p^T dout; dp = dout v^T; ds = p (dp - row_dot); dq = scale ds k; dk += ds^T (scale q)
        products.add_dvalues(probs, lo, n);
        products.dprobs(lo, n, dprobs);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < n; ++j) dprobs[r * S + j] = probs[r * S + j] * (dprobs[r * S + j] - row_dot[r]);
        }
        products.dqueries(dprobs, lo, n, dqueries);
        products.add_dkeys(dprobs, lo, n);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = dq + d.q_at(b, t0 + r, h);
        for (int64_t c = 0; c < K; ++c) dst[c] = narrow<T>(d.scale * dqueries[r * K + c]);
      }
    }
  }
  products.store(dk, dv, b, g);
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

ffi::Error forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer mask,
                   float scale, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse) {
  Shape d;
  if (auto error = shape_of(q, k, v, mask, scale, &d); error.failure()) return error;
  auto run = [&](auto type) {
    using T = decltype(type);
    if (d.q_len <= kFewRows) {
      return forward_rows<T>(pool, d, as<T>(q), as<T>(k), as<T>(v), as<uint8_t>(mask), as<T>(out), as<float>(lse));
    }
    transformer_jax::run_blocks(pool, d.batch * d.heads, [&, d](int64_t task) {
      forward_head<T>(d, as<T>(q), as<T>(k), as<T>(v), as<uint8_t>(mask), as<T>(out),
                      as<float>(lse), task / d.heads, task % d.heads);
    });
  };
  return by_dtype(q.element_type(), "attention", run);
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
  return by_dtype(q.element_type(), "attention", run);
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
