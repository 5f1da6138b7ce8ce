// Thread policy for the CPU attention kernels.
//
// A parallel region costs every thread a wake-up and a join, and on a shared machine it costs
// far more: the join waits for every thread, so a thread that another process keeps off its core
// stalls the whole call for a scheduler time slice (milliseconds). Hence:
//  - a region opens only for work worth it: threads_for() grants one thread per GRAIN of
//    estimated single-thread work, so small calls (a decoding step of a short cache) run inline;
//  - work is split into more chunks than threads and claimed dynamically (an atomic counter),
//    so a thread that starts late or runs slowly takes fewer chunks instead of delaying the
//    others by a fixed share.
//  - when a region shows that a thread could not run (the others idled, waiting for it, for a
//    large part of the region), the next calls run on the calling thread alone, for a number
//    of calls that doubles while it keeps happening (16 up to 4096) and resets after a clean
//    region: on a shared machine one unhindered thread beats two that wait for each other.
// Chunks are fixed by the problem and the configured thread count, not by how many threads run
// them or which, so results accumulated per chunk are reproducible for a fixed thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastattn::cpu {

// Single-thread work (in units of ~1 ns of this machine's time, estimated by the caller) that
// pays for one more thread.
constexpr double GRAIN = 150e3;

inline int threads_for(double work) {
  const int max_threads = at::get_num_threads();
  if (max_threads <= 1 || work < 2 * GRAIN) return 1;
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
#endif
  return (int)std::max<double>(1.0, std::min<double>(max_threads, work / GRAIN));
}

// The back-off state shared by all calls (see the header comment).
struct Backoff {
  std::atomic<int> solo_left{0}, next{16};
};
inline Backoff& backoff() {
  static Backoff b;
  return b;
}

// How many of the planned threads to run now: 1 while backing off.
inline int runnable_threads(int planned) {
  if (planned <= 1) return planned;
  Backoff& b = backoff();
  const int left = b.solo_left.load(std::memory_order_relaxed);
  if (left > 0) {
    b.solo_left.store(left - 1, std::memory_order_relaxed);
    return 1;
  }
  return planned;
}

// After a region of wall time `wall` in which its n threads spent `busy` (summed) inside
// chunks: idle threads for more than 40% of n · wall mean one of them could not run.
inline void report_region(double wall, double busy, int n) {
  if (wall < 100e-6) return;  // too short to tell a stall from the start-up cost
  Backoff& b = backoff();
  if (n * wall - busy > 0.4 * n * wall) {
    const int calls = b.next.load(std::memory_order_relaxed);
    b.solo_left.store(calls, std::memory_order_relaxed);
    b.next.store(std::min(2 * calls, 4096), std::memory_order_relaxed);
  } else {
    b.next.store(16, std::memory_order_relaxed);
  }
}

inline double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Phases of chunks in one parallel region (one wake-up and one join for all of them): phase p
// runs fn_p(chunk, slot) for chunk in [0, n_p); a barrier separates phases; chunks are claimed
// dynamically; slot in [0, n_threads) names the running thread for per-thread scratch. Runs
// inline on the caller when one thread is planned or while backing off.
template <class F1, class F2>
void run_two_phases(int64_t n1, const F1& f1, int64_t n2, const F2& f2, int n_threads) {
  n_threads = runnable_threads((int)std::min<int64_t>(n_threads, std::max(n1, n2)));
  if (n_threads <= 1) {
    for (int64_t c = 0; c < n1; ++c) f1(c, 0);
    for (int64_t c = 0; c < n2; ++c) f2(c, 0);
    return;
  }
#ifdef _OPENMP
  std::atomic<int64_t> next1{0}, next2{0};
  std::atomic<double> busy{0.0};
  const double t0 = seconds_now();
#pragma omp parallel num_threads(n_threads)
  {
    const int slot = omp_get_thread_num();
    double mine = 0.0;
    for (int64_t c; (c = next1.fetch_add(1, std::memory_order_relaxed)) < n1;) {
      const double s = seconds_now();
      f1(c, slot);
      mine += seconds_now() - s;
    }
#pragma omp barrier
    for (int64_t c; (c = next2.fetch_add(1, std::memory_order_relaxed)) < n2;) {
      const double s = seconds_now();
      f2(c, slot);
      mine += seconds_now() - s;
    }
    double cur = busy.load();
    while (!busy.compare_exchange_weak(cur, cur + mine)) {
    }
  }
  report_region(seconds_now() - t0, busy.load(), n_threads);
#else
  for (int64_t c = 0; c < n1; ++c) f1(c, 0);
  for (int64_t c = 0; c < n2; ++c) f2(c, 0);
#endif
}

// fn(chunk, slot) for every chunk in [0, n_chunks), as one phase of run_two_phases.
template <class F>
void run_chunks(int64_t n_chunks, int n_threads, const F& fn) {
  run_two_phases(0, [](int64_t, int) {}, n_chunks, fn, n_threads);
}

}  // namespace fastattn::cpu
