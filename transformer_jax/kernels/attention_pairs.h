// attention.cc's products for bfloat16 operands on a CPU with AVX512-BF16 (attention_products.h's paired kind):
// the operands laid out as bfloat16 pairs once per head or block, multiplied by bf16_gemm.h's pair_gemm. The scale
// multiplies the float32 logits and the float32 key gradient, not the bfloat16 queries, which would round them again.
#ifndef TRANSFORMER_JAX_KERNELS_ATTENTION_PAIRS_H_
#define TRANSFORMER_JAX_KERNELS_ATTENTION_PAIRS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "attention_products.h"
#include "bf16_gemm.h"
#include "word_transpose.h"

namespace transformer_jax {

#if defined(TRANSFORMER_JAX_BF16_PAIRS)

// Head g of batch b, (S, K) where it lies, as the right operand of a product over K: (ceil(K / 2), S) pairs. With K
// even each row of pairs is a row of 32-bit words, transposed in registers; an odd K pairs its last feature with 0.
inline void pairs_over_features(const uint16_t* x, const Shape& d, int64_t b, int64_t g, uint32_t* out) {
  const int64_t K = d.head_dim, S = d.kv_len, whole = K / 2;
  if (K % 2 == 0) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(x + d.kv_at(b, 0, g));
    transpose_words(words, d.kv_heads * whole, out, S, S, whole);
    return;
  }
  constexpr int64_t kStrip = 16;  // rows at a time, so that each pair row's writes fill whole cache lines
  for (int64_t s0 = 0; s0 < S; s0 += kStrip) {
    const int64_t s1 = std::min(S, s0 + kStrip);
    for (int64_t p = 0; p < whole; ++p) {
      for (int64_t s = s0; s < s1; ++s) std::memcpy(out + p * S + s, x + d.kv_at(b, s, g) + 2 * p, sizeof(uint32_t));
    }
    for (int64_t s = s0; s < s1; ++s) out[whole * S + s] = pair_of(x[d.kv_at(b, s, g) + K - 1], 0);
  }
}

// The same head as the right operand of a product over S: (ceil(S / 2), K) pairs of rows.
inline void pairs_over_positions(const uint16_t* x, const Shape& d, int64_t b, int64_t g, uint32_t* out) {
  const int64_t K = d.head_dim, S = d.kv_len;
  for (int64_t s = 0; s < S; s += 2) {
    const uint16_t* low = x + d.kv_at(b, s, g);
    const uint16_t* high = s + 1 < S ? x + d.kv_at(b, s + 1, g) : nullptr;
    for (int64_t c = 0; c < K; ++c) out[s / 2 * K + c] = pair_of(low[c], high ? high[c] : uint16_t{0});
  }
}

// Rows [t0, t0 + rows) of query-shaped head h as a left operand over K: (rows, K rounded up to even).
inline void rows_over_features(const uint16_t* x, const Shape& d, int64_t b, int64_t t0, int64_t rows, int64_t h,
                               uint16_t* out) {
  const int64_t K = d.head_dim, ld = K + K % 2;
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * ld, x + d.q_at(b, t0 + r, h), K * sizeof(uint16_t));
    if (K % 2) out[r * ld + K] = 0;
  }
}

// The same rows as a left operand over the rows: (K, kQueryBlock), a zero after an odd count of rows.
inline void features_over_rows(const uint16_t* x, const Shape& d, int64_t b, int64_t t0, int64_t rows, int64_t h,
                               uint16_t* out) {
  const int64_t K = d.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = x + d.q_at(b, t0 + r, h);
    for (int64_t c = 0; c < K; ++c) out[c * kQueryBlock + r] = row[c];
  }
  if (rows % 2) {
    for (int64_t c = 0; c < K; ++c) out[c * kQueryBlock + rows] = 0;
  }
}

// x (rows, n), rows S apart, as the right operand of a product over its rows: (ceil(rows / 2), n) pairs.
inline void pairs_over_rows(const float* x, int64_t rows, int64_t n, int64_t S, uint32_t* out) {
  for (int64_t r = 0; r < rows; r += 2) {
    round_row_pair(x + r * S, r + 1 < rows ? x + (r + 1) * S : nullptr, n, out + r / 2 * n);
  }
}

// The pairs of n bfloat16 values: a row of n as a left operand, a depth of n as a right one.
inline int64_t pair_count(int64_t n) { return (n + 1) / 2; }

// out (rows, n), rows S apart: a (rows, K) over its features by b, pairs over features, from column lo.
inline void product_over_features(const Shape& d, const uint16_t* a, const uint32_t* b, int64_t lo, int64_t n,
                                  int64_t rows, float* out) {
  pair_gemm(a, 2 * pair_count(d.head_dim), b + lo, d.kv_len, out, d.kv_len, rows, n, d.head_dim, false);
}

// result (rows, K) = x (rows, n; rows S apart) rounded to bfloat16 (into `rounded`, rows of S rounded up to even)
// by b, pairs over positions, from position lo (a whole number of vectors, so even).
inline void product_over_positions(const Shape& d, const float* x, const uint32_t* b, int64_t lo, int64_t n,
                                   int64_t rows, uint16_t* rounded, float* result) {
  const int64_t K = d.head_dim, S = d.kv_len, ld = 2 * pair_count(S);
  for (int64_t r = 0; r < rows; ++r) round_row(x + r * S, n, rounded + r * ld);
  pair_gemm(rounded, ld, b + lo / 2 * K, K, result, K, rows, K, n, false);
}

// acc (K, n), rows S apart from column lo, += a (K, rows), features over rows, by x (rows, n; rows S apart) rounded
// to bfloat16 (into `pairs`, pairs over rows).
inline void add_product_over_rows(const Shape& d, const uint16_t* a, const float* x, int64_t lo, int64_t n,
                                  int64_t rows, uint32_t* pairs, float* acc) {
  pairs_over_rows(x, rows, n, d.kv_len, pairs);
  pair_gemm(a, kQueryBlock, pairs, n, acc + lo, d.kv_len, d.head_dim, n, rows, true);
}

class PairForward {
 public:
  PairForward(const Shape& d, const uint16_t* k, const uint16_t* v, int64_t b, int64_t g)
      : d_(d),
        scratch_({pair_count(d.head_dim) * d.kv_len, pair_count(d.kv_len) * d.head_dim,
                  kQueryBlock * pair_count(d.head_dim), kQueryBlock * pair_count(d.kv_len)}) {
    pairs_over_features(k, d, b, g, scratch_.as<uint32_t>(0));
    pairs_over_positions(v, d, b, g, scratch_.as<uint32_t>(1));
  }
  void queries(const uint16_t* q, int64_t b, int64_t t0, int64_t rows, int64_t h) {
    rows_over_features(q, d_, b, t0, rows, h, scratch_.as<uint16_t>(2));
    rows_ = rows;
  }
  // the logits (rows, n), unscaled: scaling the float32 logits, not the bfloat16 queries, rounds nothing again
  void logits(int64_t lo, int64_t n, float* out) const {
    product_over_features(d_, scratch_.as<uint16_t>(2), scratch_.as<uint32_t>(0), lo, n, rows_, out);
  }
  float logit_scale() const { return d_.scale; }
  void weighted_values(const float* weights, int64_t lo, int64_t n, float* result) const {
    product_over_positions(d_, weights, scratch_.as<uint32_t>(1), lo, n, rows_, scratch_.as<uint16_t>(3), result);
  }

 private:
  const Shape& d_;
  // keys over K, values over S, the block's queries (rows, K), its weights rounded (rows, S)
  Scratch<4> scratch_;
  int64_t rows_ = 0;
};

class PairBackward {
 public:
  PairBackward(const Shape& d, const uint16_t* k, const uint16_t* v, int64_t b, int64_t g)
      : d_(d),
        scratch_({pair_count(K()) * S(), pair_count(K()) * S(), pair_count(S()) * K(), K() * S(), K() * S(),
                  kQueryBlock * pair_count(K()), K() * kQueryBlock / 2, kQueryBlock * pair_count(K()),
                  K() * kQueryBlock / 2, kQueryBlock / 2 * S(), kQueryBlock * pair_count(S()), S() * K()}) {
    pairs_over_features(k, d, b, g, scratch_.as<uint32_t>(0));
    pairs_over_features(v, d, b, g, scratch_.as<uint32_t>(1));
    pairs_over_positions(k, d, b, g, scratch_.as<uint32_t>(2));
    std::fill(scratch_.pieces[3], scratch_.pieces[3] + K() * S(), 0.0f);
    std::fill(scratch_.pieces[4], scratch_.pieces[4] + K() * S(), 0.0f);
  }
  void block(const uint16_t* q, const uint16_t* dout, int64_t b, int64_t t0, int64_t rows, int64_t h) {
    rows_over_features(q, d_, b, t0, rows, h, scratch_.as<uint16_t>(5));
    features_over_rows(q, d_, b, t0, rows, h, scratch_.as<uint16_t>(6));
    rows_over_features(dout, d_, b, t0, rows, h, scratch_.as<uint16_t>(7));
    features_over_rows(dout, d_, b, t0, rows, h, scratch_.as<uint16_t>(8));
    rows_ = rows;
  }
  void logits(int64_t lo, int64_t n, float* out) const {
    product_over_features(d_, scratch_.as<uint16_t>(5), scratch_.as<uint32_t>(0), lo, n, rows_, out);
  }
  float logit_scale() const { return d_.scale; }
  // dv^T (K, n) += dout^T p
  void add_dvalues(const float* probs, int64_t lo, int64_t n) {
    add_product_over_rows(d_, scratch_.as<uint16_t>(8), probs, lo, n, rows_, scratch_.as<uint32_t>(9),
                          scratch_.pieces[4]);
  }
  void dprobs(int64_t lo, int64_t n, float* out) const {
    product_over_features(d_, scratch_.as<uint16_t>(7), scratch_.as<uint32_t>(1), lo, n, rows_, out);
  }
  void dqueries(const float* ds, int64_t lo, int64_t n, float* out) const {
    product_over_positions(d_, ds, scratch_.as<uint32_t>(2), lo, n, rows_, scratch_.as<uint16_t>(10), out);
  }
  // dk^T (K, n) += q^T ds, scaled when stored
  void add_dkeys(const float* ds, int64_t lo, int64_t n) {
    add_product_over_rows(d_, scratch_.as<uint16_t>(6), ds, lo, n, rows_, scratch_.as<uint32_t>(9),
                          scratch_.pieces[3]);
  }
  // dk (scaled here) and dv of head g: each transposed back to (S, K) in L2, then rounded row by row
  void store(uint16_t* dk, uint16_t* dv, int64_t b, int64_t g) const {
    float* rows = scratch_.pieces[11];
    for (const auto& [gradient, transposed, factor] :
         {std::tuple{dk, scratch_.pieces[3], d_.scale}, std::tuple{dv, scratch_.pieces[4], 1.0f}}) {
      transpose_words(transposed, S(), rows, K(), K(), S());
      store_head(rows, factor, d_, b, g, gradient);
    }
  }

 private:
  int64_t K() const { return d_.head_dim; }
  int64_t S() const { return d_.kv_len; }
  const Shape& d_;
  // keys and values over K, keys over S, dk^T and dv^T (K, S) float32; the block's queries and douts over K and
  // over their rows; a block's weights or their gradient as pairs over rows, and that gradient rounded over S; dk or
  // dv (S, K) on its way out
  Scratch<12> scratch_;
  int64_t rows_ = 0;
};

template <>
struct ProductsFor<uint16_t> {
  using Forward = PairForward;
  using Backward = PairBackward;
};

#endif  // TRANSFORMER_JAX_BF16_PAIRS

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ATTENTION_PAIRS_H_
