// Helper threads that stay awake between the small products of a decoding step.
//
// A decoding step at batch 1 runs a few dozen products of 0.3-2 MB of weights, each 40-150 us, with small ops
// between them. Shared out over XLA's intra-op pool (pool_blocks.h), each product wakes a sleeping pool thread, and
// under a hypervisor an idle virtual CPU takes tens of microseconds to wake: the caller has often read most of the
// weights alone, at one core's bandwidth, before the helper starts. These helpers spin, yielding the core to any
// other runnable thread, for kAwake after each job before they sleep, so the next product finds them running.
#ifndef TRANSFORMER_JAX_KERNELS_AWAKE_HELPERS_H_
#define TRANSFORMER_JAX_KERNELS_AWAKE_HELPERS_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "pool_blocks.h"

namespace transformer_jax {

class AwakeHelpers {
 public:
  static constexpr std::chrono::microseconds kAwake{500};

  // Runs run(0..count-1) on the caller and the helpers; false (nothing run) when another caller's job holds them.
  bool run(int64_t count, std::function<void(int64_t)> run) {
    std::unique_lock<std::mutex> held(busy_, std::try_to_lock);
    if (!held.owns_lock()) return false;
    auto blocks = std::make_shared<Blocks>();
    blocks->count = count;
    blocks->run = std::move(run);
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      job_ = blocks;
    }
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    claim_blocks(*blocks);
    // a helper that comes late finds no block left; the shared state outlives the call for it
    while (blocks->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
    return true;
  }

  // The process's helpers, threads - 1 of them (started on first use).
  static AwakeHelpers& shared(int64_t threads) {
    static AwakeHelpers* helpers = new AwakeHelpers(std::max<int64_t>(1, threads) - 1);  // never destroyed
    return *helpers;
  }

  int64_t helpers() const { return helpers_; }

 private:
  explicit AwakeHelpers(int64_t helpers) : helpers_(helpers) {
    for (int64_t i = 0; i < helpers; ++i) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = generation_.load(std::memory_order_seq_cst);
    for (;;) {
      const auto since = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_seq_cst) == seen) {
        if (std::chrono::steady_clock::now() - since > kAwake) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
          break;
        }
        std::this_thread::yield();
      }
      seen = generation_.load(std::memory_order_seq_cst);
      std::shared_ptr<Blocks> blocks;
      {
        std::lock_guard<std::mutex> lock(job_mutex_);
        blocks = job_;
      }
      if (blocks) claim_blocks(*blocks);
    }
  }

  const int64_t helpers_;
  std::mutex busy_;  // one job at a time
  std::mutex job_mutex_;
  std::shared_ptr<Blocks> job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> sleeping_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

// run_blocks on the awake helpers where they are free, else on XLA's pool.
inline void run_blocks_awake(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  AwakeHelpers& helpers = AwakeHelpers::shared(pool.num_threads());
  if (count > 1 && helpers.helpers() > 0 && helpers.run(count, run)) return;
  run_blocks(pool, count, std::move(run));
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_AWAKE_HELPERS_H_
