// Portable CUDA layer: every .cu kernel in csrc/cuda includes this header instead of the CUDA
// runtime headers, so that it compiles two ways:
//  - with nvcc (a real build, and CI's compile check), where the macros below are plain CUDA;
//  - as host C++20 with -DFASTATTN_CUDA_EMULATE, where a kernel launch runs the grid's blocks one
//    after another and each of a block's threads is an OS thread with real barriers. This is how
//    CI tests the kernels' logic on CPU tensors without a GPU (see fastattn/_cuda_emu.py).
// The subset of CUDA kernels may use, and the emulator's limits, are listed in csrc/emu/README.md.
#pragma once

#if defined(__CUDACC__) && !defined(FASTATTN_CUDA_EMULATE)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#else  // CPU emulation: host headers and CUDA's keywords

#include <cuda_bf16.h>  // host-usable: __half / __nv_bfloat16 and their conversions
#include <cuda_fp16.h>
#include <vector_types.h>  // dim3, uint3, float4, ...

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __align__
#define __align__(n) alignas(n)
#endif
#endif

// Conversions both ways, the same in a real and an emulated build.
__host__ __device__ __forceinline__ float fa_to_float(float x) { return x; }
__host__ __device__ __forceinline__ double fa_to_float(double x) { return x; }
__host__ __device__ __forceinline__ float fa_to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float fa_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__host__ __device__ __forceinline__ T fa_from_float(float x);
template <>
__host__ __device__ __forceinline__ float fa_from_float<float>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ double fa_from_float<double>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ __half fa_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 fa_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

#if defined(__CUDACC__) && !defined(FASTATTN_CUDA_EMULATE)

typedef cudaStream_t fa_stream_t;
#define FA_SHARED __shared__
// One byte array for every kernel: extern __shared__ declarations of different types clash.
// 128-byte alignment: WMMA tiles at the base need 32, and this holds after static arrays too.
#define FA_DYNAMIC_SMEM(T, name)                                    \
  extern __shared__ __align__(128) unsigned char fa_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(fa_dynamic_smem_)
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define FA_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes))

inline const char* fa_last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#else  // ---------------------------------------------------------------- CPU emulation

// Blocks run one at a time, so one static instance per kernel is the block's shared memory.
#define FA_SHARED static

// cuda_fp16.h brings the runtime API's declarations (types, not definitions) along.
typedef cudaStream_t fa_stream_t;

namespace fa_emu {

struct Warp {
  std::optional<std::barrier<>> bar;
  uint64_t slot[32];
};

// What the threads of the running block share.
struct Block {
  unsigned nthreads = 0;
  std::optional<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* dynamic_smem = nullptr;
  size_t smem_bytes = 0;
  void reset() {  // called by one thread between blocks, while the others wait
    // A NaN pattern, so that reading shared memory no thread of this block wrote shows up.
    std::memset(dynamic_smem, 0xFF, smem_bytes);
    bar.emplace(nthreads);
    for (size_t w = 0; w < warps.size(); ++w) {
      unsigned lanes = std::min<unsigned>(32, nthreads - 32 * static_cast<unsigned>(w));
      warps[w]->bar.emplace(lanes);
    }
  }
};

inline thread_local uint3 t_thread_idx;
inline thread_local uint3 t_block_idx;
inline thread_local dim3 t_block_dim;
inline thread_local dim3 t_grid_dim;
inline thread_local unsigned t_linear = 0;
inline thread_local Block* t_block = nullptr;

inline std::mutex& atomic_mutex() {
  static std::mutex m;
  return m;
}

inline Warp& warp() { return *t_block->warps[t_linear / 32]; }

// What a GPU would reject, checked here so the emulator fails where the hardware would:
// dynamic shared memory above 48 KB without the opt-in, or above the largest (Hopper's 227 KB).
constexpr size_t kDefaultSmem = 48 * 1024;
// The device's opt-in limit: Hopper's 227 KB unless a test plays another GPU (A100: 163 KB,
// sm_86/89: 99 KB) with set_device_max_smem.
inline size_t& device_max_smem() {
  static size_t bytes = 227 * 1024;
  return bytes;
}
inline void set_device_max_smem(size_t bytes) { device_max_smem() = bytes; }
inline std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<std::pair<const void*, size_t>>& smem_optins() {
  static std::vector<std::pair<const void*, size_t>> v;
  return v;
}
inline void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> g(registry_mutex());
  for (auto& e : smem_optins())
    if (e.first == kernel) {
      e.second = bytes;
      return;
    }
  smem_optins().emplace_back(kernel, bytes);
}
inline const char* smem_error(const void* kernel, size_t bytes) {
  if (bytes <= kDefaultSmem) return nullptr;
  if (bytes > device_max_smem()) return "fa_emu: dynamic shared memory above the device's limit";
  std::lock_guard<std::mutex> g(registry_mutex());
  for (auto& e : smem_optins())
    if (e.first == kernel && e.second >= bytes) return nullptr;
  return "fa_emu: dynamic shared memory above 48 KB needs FA_SET_MAX_DYNAMIC_SMEM first";
}

struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};
inline unsigned lane() { return t_linear % 32; }

template <typename T>
T exchange(T v, unsigned (*source)(unsigned lane, unsigned arg, unsigned width), unsigned arg, unsigned width) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  Warp& w = warp();
  unsigned me = lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[me] = bits;
  w.bar->arrive_and_wait();
  uint64_t got = w.slot[source(me, arg, width)];
  w.bar->arrive_and_wait();  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline unsigned segment(unsigned lane, unsigned width) { return lane & ~(width - 1); }
inline unsigned src_idx(unsigned lane, unsigned src, unsigned width) { return segment(lane, width) + src % width; }
inline unsigned src_xor(unsigned lane, unsigned m, unsigned width) {
  unsigned s = lane ^ m;
  return segment(s, width) == segment(lane, width) ? s : lane;
}
inline unsigned src_down(unsigned lane, unsigned d, unsigned width) {
  unsigned s = lane + d;
  return s < segment(lane, width) + width ? s : lane;
}
inline unsigned src_up(unsigned lane, unsigned d, unsigned width) {
  return lane >= segment(lane, width) + d ? lane - d : lane;
}

// Runs kernel(args...) over grid x block: blocks in order, each thread of a block on its own
// OS thread. A thread that returns early leaves the block's barriers (arrive_and_drop), like an
// exited GPU thread.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024) throw Fault("fa_emu: block size must be 1..1024 threads");
  if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw Fault("fa_emu: invalid grid (y and z at most 65535, none empty)");
  if (const char* why = smem_error(reinterpret_cast<const void*>(kernel), smem_bytes)) throw Fault(why);
  std::vector<unsigned char> smem(smem_bytes + 128);
  Block state;
  state.nthreads = n;
  state.dynamic_smem = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  state.smem_bytes = smem_bytes;
  for (unsigned w = 0; w < (n + 31) / 32; ++w) state.warps.emplace_back(new Warp());
  std::barrier<> step(n);
  std::tuple<std::decay_t<KArgs>...> packed(static_cast<std::decay_t<KArgs>>(args)...);
  std::exception_ptr error;
  std::mutex error_mutex;
  auto body = [&](unsigned t) {
    t_linear = t;
    t_thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    t_block_dim = block;
    t_grid_dim = grid;
    t_block = &state;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (t == 0) state.reset();
          step.arrive_and_wait();
          t_block_idx = uint3{bx, by, bz};
          try {
            std::apply(kernel, packed);
          } catch (...) {
            std::lock_guard<std::mutex> g(error_mutex);
            if (!error) error = std::current_exception();
          }
          state.bar->arrive_and_drop();
          state.warps[t / 32]->bar->arrive_and_drop();
          step.arrive_and_wait();
        }
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t) threads.emplace_back(body, t);
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace fa_emu

#define threadIdx (fa_emu::t_thread_idx)
#define blockIdx (fa_emu::t_block_idx)
#define blockDim (fa_emu::t_block_dim)
#define gridDim (fa_emu::t_grid_dim)

#define FA_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(fa_emu::t_block->dynamic_smem)
#define FA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), fa_emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem), __VA_ARGS__))
#define FA_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  fa_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<size_t>(bytes))

inline const char* fa_last_error() { return nullptr; }

inline void __syncthreads() { fa_emu::t_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { fa_emu::warp().bar->arrive_and_wait(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { std::abort(); }

template <typename T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return fa_emu::exchange(v, fa_emu::src_idx, static_cast<unsigned>(src), width);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return fa_emu::exchange(v, fa_emu::src_xor, static_cast<unsigned>(mask), width);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  return fa_emu::exchange(v, fa_emu::src_down, d, width);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  return fa_emu::exchange(v, fa_emu::src_up, d, width);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  fa_emu::Warp& w = fa_emu::warp();
  w.slot[fa_emu::lane()] = pred ? 1 : 0;
  w.bar->arrive_and_wait();
  unsigned mask = 0;
  for (unsigned i = 0; i < 32 && 32 * (fa_emu::t_linear / 32) + i < fa_emu::t_block->nthreads; ++i)
    mask |= static_cast<unsigned>(w.slot[i]) << i;
  w.bar->arrive_and_wait();
  return mask;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
  unsigned lanes = std::min<unsigned>(32, fa_emu::t_block->nthreads - 32 * (fa_emu::t_linear / 32));
  unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  return __ballot_sync(m, pred) == full;
}

// Atomics: one process-wide lock is slow but exactly the semantics kernels rely on.
#define FA_EMU_ATOMIC(name, expr)                                     \
  template <typename T, typename U>                                   \
  T name(T* p, U v_) {                                                \
    std::lock_guard<std::mutex> g(fa_emu::atomic_mutex());            \
    T v = static_cast<T>(v_);                                         \
    T old = *p;                                                       \
    *p = (expr);                                                      \
    return old;                                                       \
  }
FA_EMU_ATOMIC(atomicAdd, old + v)
FA_EMU_ATOMIC(atomicSub, old - v)
FA_EMU_ATOMIC(atomicMax, std::max(old, v))
FA_EMU_ATOMIC(atomicMin, std::min(old, v))
FA_EMU_ATOMIC(atomicOr, old | v)
FA_EMU_ATOMIC(atomicAnd, old & v)
FA_EMU_ATOMIC(atomicXor, old ^ v)
FA_EMU_ATOMIC(atomicExch, v)
#undef FA_EMU_ATOMIC
template <typename T, typename U, typename V>
T atomicCAS(T* p, U compare, V val) {
  std::lock_guard<std::mutex> g(fa_emu::atomic_mutex());
  T old = *p;
  if (old == static_cast<T>(compare)) *p = static_cast<T>(val);
  return old;
}

// CUDA's min/max accept mixed int/unsigned/float arguments.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
#define FA_EMU_BITCAST(name, From, To) \
  inline To name(From x) {             \
    To y;                              \
    std::memcpy(&y, &x, sizeof(To));   \
    return y;                          \
  }
FA_EMU_BITCAST(__int_as_float, int, float)
FA_EMU_BITCAST(__uint_as_float, unsigned, float)
FA_EMU_BITCAST(__float_as_int, float, int)
FA_EMU_BITCAST(__float_as_uint, float, unsigned)
FA_EMU_BITCAST(__double_as_longlong, double, long long)
FA_EMU_BITCAST(__longlong_as_double, long long, double)
#undef FA_EMU_BITCAST

// Host-side runtime calls that launchers may make (the runtime library is not linked).
inline cudaError_t fa_emu_memset_async(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t fa_emu_memcpy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                       cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
#define cudaMemsetAsync fa_emu_memset_async
#define cudaMemcpyAsync fa_emu_memcpy_async

// Tensor cores: in emulation every lane holds the whole 16x16 tile (row-major in x), so only
// position-independent elementwise use of frag.x is portable. Loads, stores and products are
// warp-collective on a GPU ("_sync"): every lane arrives before any lane goes on, which is what
// makes load C -> mma -> store C in place correct; the warp barriers below model that.
namespace nvcuda {
namespace wmma {
inline void collective() {
  if (fa_emu::t_block != nullptr) fa_emu::warp().bar->arrive_and_wait();
}
// The hardware's requirements: 256-bit aligned pointers, leading dimensions of 16-byte multiples.
template <typename T>
inline void check_tile(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) throw fa_emu::Fault("fa_emu: wmma pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) throw fa_emu::Fault("fa_emu: wmma ldm not a multiple of 16 bytes");
}
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  constexpr bool row = std::is_same_v<L, row_major>;
  using F = fragment<Use, M, N, K, T, L>;
  check_tile(p, ldm);
  collective();
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = row ? p[r * ldm + c] : p[c * ldm + r];
  collective();
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  check_tile(p, ldm);
  collective();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  collective();
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_tile(static_cast<const T*>(p), ldm);
  collective();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
  collective();
}


// d = a·b + c with fp32 products and sums, like the tensor cores' fp32 accumulation.
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; ++k) s += fa_to_float(a.x[m * K + k]) * fa_to_float(b.x[k * N + n]);
      out[m * N + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda

#endif  // FASTATTN_CUDA_EMULATE
