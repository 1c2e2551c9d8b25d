// The thread pool of thread_pool.h.
//
// Helpers claim chunks from a shared ticket (gen << 40 | n << 20 | next); the caller claims too and
// then waits only for chunks a helper already holds, so a helper descheduled by another process
// before it claimed anything costs nothing. When the caller had to wait long for a claimed chunk
// (the helper's core was taken), jobs run on the caller alone for backoff_ms.
#include "thread_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace mtp {
namespace pool {
namespace {

constexpr uint64_t kMask = kMaxChunks;
TaskFn task_fn = nullptr;
const void* task_ctx = nullptr;
std::atomic<uint64_t> ticket{0};
std::atomic<int64_t> done{0};
// leaked on purpose: detached helpers may still wait on them during static destruction at exit
std::mutex& mu = *new std::mutex;
std::mutex& call_mu = *new std::mutex;
std::condition_variable& cv = *new std::condition_variable;
int64_t nhelpers_started = 0;
std::atomic<bool> stop{false};
std::atomic<int64_t> spin_us{200};
uint64_t gen = 0;
std::atomic<int64_t> backoff_ms{50};
int64_t solo_until_ns = 0;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
}

enum { NONE_LEFT = 0, RAN = 1, RETRY = 2 };
int try_one() {
  uint64_t t = ticket.load(std::memory_order_acquire);
  const uint64_t n = (t >> 20) & kMask, i = t & kMask;
  if (i >= n) return NONE_LEFT;
  if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) return RETRY;
  task_fn(task_ctx, (int64_t)i);
  done.fetch_add(1, std::memory_order_release);
  return RAN;
}

void helper_loop() {
  using clk = std::chrono::steady_clock;
  auto idle_since = clk::now();
  int polls = 0;
  while (!stop.load(std::memory_order_relaxed)) {
    if (try_one()) { idle_since = clk::now(); continue; }
    _mm_pause();
    if (++polls < 256) continue;
    polls = 0;
    if (clk::now() - idle_since < std::chrono::microseconds(spin_us.load(std::memory_order_relaxed))) continue;
    uint64_t seen = ticket.load(std::memory_order_acquire);
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] {
      uint64_t t = ticket.load(std::memory_order_acquire);
      return stop.load() || (t != seen && (t & kMask) < ((t >> 20) & kMask));
    });
    idle_since = clk::now();
  }
}

void ensure(int64_t nhelpers) {
  for (; nhelpers_started < nhelpers; ++nhelpers_started) std::thread(helper_loop).detach();
}

}  // namespace

void run(TaskFn fn, const void* ctx, int64_t nchunks, int64_t threads) {
  std::unique_lock<std::mutex> call_lk(call_mu, std::defer_lock);
  if (threads > 1 && nchunks > 1) {
    call_lk.lock();
    if (backoff_ms.load(std::memory_order_relaxed) > 0 && now_ns() < solo_until_ns) call_lk.unlock();
  }
  if (!call_lk.owns_lock()) {
    for (int64_t c = 0; c < nchunks; ++c) fn(ctx, c);
    return;
  }
  ensure(threads - 1);
  task_fn = fn;
  task_ctx = ctx;
  done.store(0, std::memory_order_relaxed);
  gen = (gen + 1) & ((1ull << 24) - 1);
  ticket.store(gen << 40 | (uint64_t)nchunks << 20, std::memory_order_release);
  { std::lock_guard<std::mutex> lk(mu); }
  cv.notify_all();
  const int64_t t0 = now_ns();
  int64_t mine = 0;
  for (int r; (r = try_one()) != NONE_LEFT;) mine += r == RAN;
  const int64_t t1 = now_ns();
  while (done.load(std::memory_order_acquire) < nchunks) _mm_pause();
  const int64_t waited = now_ns() - t1, per_chunk = (t1 - t0) / std::max<int64_t>(mine, 1);
  if (waited > std::max<int64_t>(200000, 8 * per_chunk))
    solo_until_ns = now_ns() + backoff_ms.load(std::memory_order_relaxed) * 1000000;
}

void set_spin_us(int64_t us) { spin_us.store(us); }
void set_backoff_ms(int64_t ms) { backoff_ms.store(ms); }

}  // namespace pool
}  // namespace mtp
