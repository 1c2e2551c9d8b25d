// A tiny thread pool: helpers claim chunks of a job from a shared ticket, and the caller never
// waits for a helper that has not started a chunk (see thread_pool.cpp). A job is any function
// over chunk indices 0..n-1: a matrix product, attention, the argmax screen.
#pragma once

#include <cstdint>

namespace mtp {
namespace pool {

typedef void (*TaskFn)(const void* ctx, int64_t chunk);
constexpr uint64_t kMaxChunks = (1ull << 20) - 1;

// fn(ctx, c) for c in [0, nchunks), over up to `threads` threads (the caller included)
void run(TaskFn fn, const void* ctx, int64_t nchunks, int64_t threads);
void set_spin_us(int64_t us);      // how long idle helpers spin before sleeping
void set_backoff_ms(int64_t ms);   // how long jobs run on the caller alone after a stalled helper

}  // namespace pool

// f(i) for i in [0, n), spread over the pool (f must not call the pool itself)
template <class F>
void parallel_for(int64_t n, int64_t threads, const F& f) {
  pool::run([](const void* c, int64_t i) { (*static_cast<const F*>(c))(i); }, &f, n, threads);
}

}  // namespace mtp
