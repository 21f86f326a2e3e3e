// Shares blocks of work out over XLA's intra-op thread pool (the pool an FFI handler gets as ffi::ThreadPool).
#ifndef TRANSFORMER_JAX_KERNELS_POOL_BLOCKS_H_
#define TRANSFORMER_JAX_KERNELS_POOL_BLOCKS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace transformer_jax {

struct Blocks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t count = 0;
  std::function<void(int64_t)> run;
};

// Claims and runs blocks until none are left (the loop of every participant, caller or helper).
inline void claim_blocks(Blocks& blocks) {
  for (;;) {
    const int64_t block = blocks.next.fetch_add(1, std::memory_order_relaxed);
    if (block >= blocks.count) return;
    blocks.run(block);
    blocks.finished.fetch_add(1, std::memory_order_release);
  }
}

// Runs run(0..count-1) on the calling thread and the pool's. Each participant claims blocks until none are left, so
// the caller waits only for blocks already running, never for a helper still queued behind other work (a helper
// that starts late finds nothing to claim; the shared state outlives the call for it).
inline void run_blocks(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  auto blocks = std::make_shared<Blocks>();
  blocks->count = count;
  blocks->run = std::move(run);
  auto work = [blocks] { claim_blocks(*blocks); };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (blocks->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_POOL_BLOCKS_H_
