// The one bounds check of raw op arguments (attention terms, sizes, SAE sizes and codes).
// Values arrive as int64 (torch ints, tensor sizes); the kernels use int32. Checking in int64
// before narrowing means no value can wrap past a check (a product of two int32 values is
// formed in int64 by the callers, where it cannot overflow either).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace fastattn {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();

// x as int32 after checking lo <= x <= hi; `what` (followed by "(term index)" when index >= 0)
// names the argument in the error. [lo, hi] must lie within int32.
inline int32_t checked_int32(int64_t x, int64_t lo, int64_t hi, const char* what, int64_t index = -1) {
  TORCH_INTERNAL_ASSERT(lo >= kInt32Min && hi <= kInt32Max, "checked_int32: bounds beyond int32");
  if (x < lo || x > hi) {
    if (index >= 0) TORCH_CHECK(false, what, " (term ", index, ") must be in [", lo, ", ", hi, "], got ", x);
    TORCH_CHECK(false, what, " must be in [", lo, ", ", hi, "], got ", x);
  }
  return static_cast<int32_t>(x);
}

// Tensor sizes the kernels hold in int32 leave 2^16 of headroom, so that rounding a size up to
// whole tiles (no tile spans more than 2^16 elements of one dimension) stays in int32 too.
constexpr int64_t kSizeMax = kInt32Max - (int64_t(1) << 16);

inline int32_t checked_size(int64_t size, const char* what) { return checked_int32(size, 0, kSizeMax, what); }

}  // namespace fastattn
