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
// with no visible key, whose output and gradients are 0. The mask and softmax of a block are attention_softmax.h's;
// a decoding step's few query rows take attention_decode.h's forward instead of blocks.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "attention_decode.h"
#include "attention_pairs.h"
#include "attention_products.h"
#include "attention_softmax.h"
#include "bfloat16.h"
#include "float_buffers.h"
#include "pool_blocks.h"

namespace ffi = xla::ffi;
using transformer_jax::as;
using transformer_jax::by_dtype;
using transformer_jax::exp_row;
using transformer_jax::forward_rows;
using transformer_jax::kFewRows;
using transformer_jax::kInf;
using transformer_jax::kQueryBlock;
using transformer_jax::mask_row;
using transformer_jax::narrow;
using transformer_jax::probabilities_row;
using transformer_jax::ProductsFor;
using transformer_jax::Scratch;
using transformer_jax::Shape;
using transformer_jax::visible_span;
using transformer_jax::widen;

namespace {

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
      const float top = n ? mask_row(row, d.visible_row(mask, b, h, t0 + r) + lo, n, products.logit_scale()) : -kInf;
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
            probabilities_row(row, d.visible_row(mask, b, h, t0 + r) + lo, n, products.logit_scale(), row_lse);
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
