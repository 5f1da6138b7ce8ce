// Per-phase CPU time of the circular relative attention kernels, for the profile that
// bench/profile_circular_relative_attention.py prints (off unless switched on: one predictable
// branch per phase boundary when off).
//
// Each thread adds the CPU time between consecutive marks to its own row of accumulators (no
// sharing, no atomics); reading sums the rows. Phases follow the kernels' structure: q·E
// products, QKᵀ, relative-score gathers, softmax, P·V; in the backward also dP = dO·Vᵀ, the
// softmax gradient, the dV/dK/dQ GEMMs, the dS scatter and the table/q gradients of the q·E
// products.
#pragma once

#include <array>
#include <atomic>
#include <time.h>

#include <string>
#include <vector>

namespace fastattn::cpu::prof {

enum Phase {
  SETUP,      // buffers, coordinates, per-call set-up
  QE,         // q·E products for the table rows a query block can read
  QK,         // S = Q Kᵀ
  GATHER,     // relative scores gathered into S, masking, scaling
  SOFTMAX,    // online softmax (forward) / probabilities from the saved lse (backward)
  PV,         // acc += P V
  DP,         // dP = dO Vᵀ
  DSOFTMAX,   // dS = P ⊙ (dP − δ)
  DV,         // dV += Pᵀ dO
  DQ,         // dQ += dS K
  DK,         // dK += dSᵀ Q
  SCATTER,    // d(q·E) += alpha · dS scattered by row
  QE_GRAD,    // dQ += d(q·E) E, dE += d(q·E)ᵀ Q
  MERGE,      // split-key merges, partial-gradient sums
  N_PHASES
};

inline const char* phase_name(int p) {
  static const char* names[N_PHASES] = {"setup", "qE", "qk", "gather", "softmax", "pv", "dp",
                                        "dsoftmax", "dv", "dq", "dk", "scatter", "qE_grad", "merge"};
  return names[p];
}

constexpr int MAX_THREADS = 256;

struct alignas(64) Row {
  double s[N_PHASES];
};

inline std::atomic<bool>& enabled() {
  static std::atomic<bool> on{false};
  return on;
}

inline std::array<Row, MAX_THREADS>& rows() {
  static std::array<Row, MAX_THREADS> r{};
  return r;
}

// Marks phase boundaries on one thread: mark(p) charges the time since the previous mark to p.
class Timer {
 public:
  explicit Timer(int tid) : on_(enabled().load(std::memory_order_relaxed) && tid >= 0 && tid < MAX_THREADS) {
    if (on_) {
      row_ = &rows()[tid];
      t0_ = now();
    }
  }
  inline void mark(Phase p) {
    if (!on_) return;
    const double t = now();
    row_->s[p] += t - t0_;
    t0_ = t;
  }

 private:
  // CPU time of this thread, not wall time: on a shared machine a descheduled thread is not
  // charged for the time others ran.
  static double now() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  }
  bool on_;
  Row* row_ = nullptr;
  double t0_ = 0.0;
};

// Seconds per phase summed over threads since the last read; then reset, and switch on or off.
inline std::vector<double> read_and_reset(bool enable) {
  std::vector<double> out(N_PHASES, 0.0);
  for (auto& r : rows())
    for (int p = 0; p < N_PHASES; ++p) {
      out[p] += r.s[p];
      r.s[p] = 0.0;
    }
  enabled().store(enable);
  return out;
}

}  // namespace fastattn::cpu::prof
