// attention.cc's forward for a decoding step's few query rows, read from the key/value cache where it lies.
#ifndef TRANSFORMER_JAX_KERNELS_ATTENTION_DECODE_H_
#define TRANSFORMER_JAX_KERNELS_ATTENTION_DECODE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "attention_products.h"
#include "attention_softmax.h"
#include "bfloat16.h"
#include "float_buffers.h"
#include "pool_blocks.h"

namespace transformer_jax {

// At most this many query rows take forward_rows. Its keys are cut into parts of at least kPartWork multiply-adds
// (H x keys x K) a row, which share the pool; a shorter span runs on the calling thread, where waking a pool thread
// would cost more than the part.
constexpr int64_t kFewRows = 4;
constexpr int64_t kPartWork = int64_t{1} << 17;

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
    top[h] = mask_row(row, d.visible_row(mask, b, h, t) + part.lo, n, 1.0f);  // the queries were scaled as loaded
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
    run_blocks(pool, P, run);
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

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ATTENTION_DECODE_H_
