// The products of attention.cc's blocks, in two kinds that its forward and backward passes take as a template
// argument: WideForward / WideBackward widen the operands into float32 blocks and multiply them with small_gemm.h's
// float32 tiles (float32 inputs; bfloat16 ones on a CPU without AVX512-BF16); PairForward / PairBackward keep
// bfloat16 operands as bfloat16 pairs for bf16_gemm.h's dot products, twice the multiply-adds an instruction.
//
// Both accumulate in float32. The paired kind rounds the softmax's weights and their gradient to bfloat16 before the
// products that use them, as XLA's bf16 einsum attention (and PyTorch's bf16 flash attention) does; the wide kind
// keeps them in float32.
//
// Layouts and scratch memory are shared with attention.cc: Shape, Scratch and the loaders are here.
#ifndef TRANSFORMER_JAX_KERNELS_ATTENTION_PRODUCTS_H_
#define TRANSFORMER_JAX_KERNELS_ATTENTION_PRODUCTS_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "bf16_gemm.h"
#include "bfloat16.h"
#include "small_gemm.h"
#include "word_transpose.h"

namespace transformer_jax {

constexpr int64_t kQueryBlock = 64;  // rows per block: (64, S) float32 logits are 64 KiB at S = 256

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

// N uninitialised buffers of 32-bit words in one allocation, each starting a 64-byte line: a whole vector load never
// straddles two lines, and nothing is zeroed that the products overwrite anyway (a std::vector zeroes its floats, a
// pass as long as the forward's products read). Sizes count 32-bit words; a bfloat16 buffer takes half a word each.
template <size_t N>
class Scratch {
 public:
  explicit Scratch(const std::array<int64_t, N>& sizes) {
    constexpr int64_t kLine = 64 / sizeof(float);
    std::array<int64_t, N + 1> starts{};  // each buffer's offset, rounded up to whole lines; the last, the total
    for (size_t i = 0; i < N; ++i) starts[i + 1] = starts[i] + (sizes[i] + kLine - 1) / kLine * kLine;
    memory_.reset(static_cast<float*>(::operator new[](starts[N] * sizeof(float), kAlign)));
    for (size_t i = 0; i < N; ++i) pieces[i] = memory_.get() + starts[i];
  }
  std::array<float*, N> pieces;
  // piece i as 32-bit words or bfloat16 halves of words
  template <typename U>
  U* as(size_t i) const {
    return reinterpret_cast<U*>(pieces[i]);
  }

 private:
  static constexpr std::align_val_t kAlign{64};
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, kAlign); }
  };
  std::unique_ptr<float[], Free> memory_;
};

// Rows [t0, t0 + rows) of head h as a (rows, K) float32 block times factor.
template <typename T>
void load_rows(const T* x, const Shape& d, int64_t b, int64_t t0, int64_t rows, int64_t h, float factor, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = x + d.q_at(b, t0 + r, h);
    for (int64_t k = 0; k < d.head_dim; ++k) out[r * d.head_dim + k] = factor * widen(src[k]);
  }
}

// Key/value head g of batch b as (S, K) float32 rows.
template <typename T>
void load_head(const T* x, const Shape& d, int64_t b, int64_t g, float* rows) {
  const int64_t K = d.head_dim;
  for (int64_t s = 0; s < d.kv_len; ++s) {
    const T* src = x + d.kv_at(b, s, g);
    for (int64_t k = 0; k < K; ++k) rows[s * K + k] = widen(src[k]);
  }
}

// The same head as its (K, S) transpose, read where it lies (float32 by word_transpose.h's tiles).
template <typename T>
void load_head_columns(const T* x, const Shape& d, int64_t b, int64_t g, float* columns) {
  const int64_t K = d.head_dim, S = d.kv_len;
  if constexpr (std::is_same_v<T, float>) {
    transpose_words(x + d.kv_at(b, 0, g), d.kv_heads * K, columns, S, S, K);
    return;
  }
  // 16 rows at a time, so that each column's writes fill whole cache lines (columns S floats apart share few sets)
  constexpr int64_t kStrip = 16;
  for (int64_t s0 = 0; s0 < S; s0 += kStrip) {
    const int64_t s1 = std::min(S, s0 + kStrip);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t s = s0; s < s1; ++s) columns[k * S + s] = widen(x[d.kv_at(b, s, g) + k]);
    }
  }
}

// A key/value head's (S, K) float32 gradient times factor, rounded into head g of batch b of dst (B, S, G, K).
template <typename T>
void store_head(const float* rows, float factor, const Shape& d, int64_t b, int64_t g, T* dst) {
  const int64_t K = d.head_dim;
  for (int64_t s = 0; s < d.kv_len; ++s) {
    T* row = dst + d.kv_at(b, s, g);
    for (int64_t c = 0; c < K; ++c) row[c] = narrow<T>(factor * rows[s * K + c]);
  }
}

// The forward's products for one query head: keys and values of its key/value head loaded once, then per block of
// query rows the scaled logits q k^T and the weighted sum of the values.
template <typename T>
class WideForward {
 public:
  WideForward(const Shape& d, const T* k, const T* v, int64_t b, int64_t g)
      : d_(d), scratch_({d.head_dim * d.kv_len, d.kv_len * d.head_dim, kQueryBlock * d.head_dim}) {
    load_head_columns(k, d, b, g, scratch_.pieces[0]);
    load_head(v, d, b, g, scratch_.pieces[1]);
  }
  // rows [t0, t0 + rows) of query head h become the block
  void queries(const T* q, int64_t b, int64_t t0, int64_t rows, int64_t h) {
    load_rows(q, d_, b, t0, rows, h, d_.scale, scratch_.pieces[2]);
    rows_ = rows;
  }
  // logits (rows, n), rows S apart: the block's queries, scaled, by keys [lo, lo + n)
  void logits(int64_t lo, int64_t n, float* out) const {
    const int64_t K = d_.head_dim, S = d_.kv_len;
    gemm(scratch_.pieces[2], K, 1, scratch_.pieces[0] + lo, S, out, S, rows_, n, K, false);
  }
  // the factor the logits still need: none, the queries were scaled as loaded
  float logit_scale() const { return 1.0f; }
  // result (rows, K) = weights (rows, n; rows S apart) by values [lo, lo + n)
  void weighted_values(const float* weights, int64_t lo, int64_t n, float* result) const {
    const int64_t K = d_.head_dim, S = d_.kv_len;
    gemm(weights, S, 1, scratch_.pieces[1] + lo * K, K, result, K, rows_, K, n, false);
  }

 private:
  const Shape& d_;
  Scratch<3> scratch_;  // keys as (K, S) columns, values (S, K), the block's scaled queries (rows, K)
  int64_t rows_ = 0;
};

// The backward's products for the query heads of one key/value head: per block of query rows of one head the
// logits again, dv += p^T dout, dp = dout v^T, dq = ds k (unscaled) and dk += ds^T (scale q); then dk and dv stored.
template <typename T>
class WideBackward {
 public:
  WideBackward(const Shape& d, const T* k, const T* v, int64_t b, int64_t g)
      : d_(d),
        scratch_({d.kv_len * d.head_dim, d.head_dim * d.kv_len, d.head_dim * d.kv_len, d.kv_len * d.head_dim,
                  d.kv_len * d.head_dim, kQueryBlock * d.head_dim, kQueryBlock * d.head_dim}) {
    const auto [keys, keys_t, values_t, dkeys, dvalues, queries, douts] = scratch_.pieces;
    load_head(k, d, b, g, keys);
    load_head_columns(k, d, b, g, keys_t);
    load_head_columns(v, d, b, g, values_t);
    std::fill(dkeys, dkeys + d.kv_len * d.head_dim, 0.0f);
    std::fill(dvalues, dvalues + d.kv_len * d.head_dim, 0.0f);
  }
  void block(const T* q, const T* dout, int64_t b, int64_t t0, int64_t rows, int64_t h) {
    load_rows(q, d_, b, t0, rows, h, d_.scale, scratch_.pieces[5]);
    load_rows(dout, d_, b, t0, rows, h, 1.0f, scratch_.pieces[6]);
    rows_ = rows;
  }
  void logits(int64_t lo, int64_t n, float* out) const {
    gemm(scratch_.pieces[5], K(), 1, scratch_.pieces[1] + lo, S(), out, S(), rows_, n, K(), false);
  }
  float logit_scale() const { return 1.0f; }
  void add_dvalues(const float* probs, int64_t lo, int64_t n) {
    gemm(probs, 1, S(), scratch_.pieces[6], K(), scratch_.pieces[4] + lo * K(), K(), n, K(), rows_, true);
  }
  void dprobs(int64_t lo, int64_t n, float* out) const {
    gemm(scratch_.pieces[6], K(), 1, scratch_.pieces[2] + lo, S(), out, S(), rows_, n, K(), false);
  }
  void dqueries(const float* ds, int64_t lo, int64_t n, float* out) const {
    gemm(ds, S(), 1, scratch_.pieces[0] + lo * K(), K(), out, K(), rows_, K(), n, false);
  }
  void add_dkeys(const float* ds, int64_t lo, int64_t n) {
    gemm(ds, 1, S(), scratch_.pieces[5], K(), scratch_.pieces[3] + lo * K(), K(), n, K(), rows_, true);
  }
  void store(T* dk, T* dv, int64_t b, int64_t g) const {
    store_head(scratch_.pieces[3], 1.0f, d_, b, g, dk);
    store_head(scratch_.pieces[4], 1.0f, d_, b, g, dv);
  }

 private:
  int64_t K() const { return d_.head_dim; }
  int64_t S() const { return d_.kv_len; }
  const Shape& d_;
  // keys (S, K), keys (K, S), values (K, S), dk and dv (S, K), the block's scaled queries and douts (rows, K)
  Scratch<7> scratch_;
  int64_t rows_ = 0;
};

template <typename T>
struct ProductsFor {
  using Forward = WideForward<T>;
  using Backward = WideBackward<T>;
};

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ATTENTION_PRODUCTS_H_
