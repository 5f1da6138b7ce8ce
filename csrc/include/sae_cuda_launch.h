// Launchers of the CUDA sparse-autoencoder kernels (csrc/cuda/sae.cu), on raw pointers only, so that
// this header is shared by the .cu (nvcc, no torch), the torch glue (csrc/include/sae_cuda_glue.h,
// used by csrc/cuda/sae_glue.cpp) and the CPU emulator wrapper (csrc/emu/sae.cpp).
//
// Every launcher returns nullptr on success or a CUDA error string. Tensors are contiguous and
// row-major; element type `dt` applies to every floating-point buffer of a call (fp32 accumulation
// inside). Callers allocate every output and workspace (sizes from the *_bytes functions) and
// pass the stream as void* (a cudaStream_t; nullptr in emulation).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastattn::sae_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---------------------------------------------------------------- TopK encoder
// Tiles of the fused encoder: rows x latents per GEMM tile (the CTA tile of every GEMM below).
constexpr int kTileM = 128;
constexpr int kTileN = 128;
// Running lists up to this k live in shared memory when they fit the device's opt-in limit
// (next to the 66-72 KB GEMM tile: sm_80 and sm_90 hold k = 64, sm_86/89's 99 KB only k <= 33 at
// fp16/bf16 and k <= 27 at fp32); otherwise they live in the workspace (same results).
constexpr int kTopkSmemMaxK = 64;
// Whether topk_encode keeps the running lists in shared memory on a device whose opt-in dynamic
// shared memory per block is max_smem bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
bool topk_smem_lists(DType dt, int64_t k, size_t max_smem);

// Column splits of the latent axis (each split keeps its own per-row candidate list); a function
// of the shapes and the SM count only. The result never depends on it (the selection is exact).
int topk_splits(int64_t N, int64_t n, int64_t k, int num_sms);
size_t topk_workspace_bytes(int64_t N, int64_t n, int64_t k, int num_sms);
// values [N, k] (dt), indices [N, k] int64: the k largest x·Wᵀ + b per row, sorted descending,
// ties by lower index. bias may be nullptr. max_smem: the device's opt-in shared memory per block.
const char* topk_encode(DType dt, const void* x, const void* weight, const void* bias, void* values,
                        int64_t* indices, void* workspace, int N, int d, int n, int k, int num_sms,
                        size_t max_smem, void* stream);

// ---------------------------------------------------------------- sparse gathers and scatters
// out[r] = Σ_k coef[r, k] · rows[idx[r, k]] (+ bias); out [N, d]. Indices outside [0, n) are skipped.
const char* gather_combine(DType dt, const void* coef, const int64_t* idx, const void* rows,
                           const void* bias, void* out, int64_t N, int k, int d, int n, void* stream);
// out[r, k] = g[r] · rows[idx[r, k]]; out [N, k].
const char* gather_dot(DType dt, const void* g, const int64_t* idx, const void* rows, void* out,
                       int64_t N, int k, int d, int n, void* stream);
// dW[j] = Σ_{p in [start[j], start[j+1])} coef[e] · X[e / k] with e = order[p] (entries of latent j
// in increasing e: a stable sort by latent), dsum[j] = Σ coef[e] (dsum may be nullptr).
// One warp per latent sums in a fixed order: deterministic, no atomics.
const char* segment_scatter(DType dt, const int64_t* order, const int64_t* start, const void* coef,
                            const void* X, void* dW, void* dsum, int64_t entries, int k, int d, int n,
                            void* stream);
// out[c] = Σ_r X[r, c] (dt out, fp64 partial sums per row chunk, summed in a fixed order).
size_t colsum_workspace_bytes(int64_t N, int64_t d);
const char* colsum(DType dt, const void* X, void* out, void* workspace, int64_t N, int d, void* stream);

// ---------------------------------------------------------------- binary encoder
// code [N, n] (dt; nullptr: not written), packed [N, ceil(n / 8)] uint8 (bit b of byte w is column
// 8w + b), counts [n] int64 (zeroed here, then integer atomics: exact and order-independent).
const char* binary_encode(DType dt, const void* x, const void* weight, const void* bias, void* code,
                          uint8_t* packed, int64_t* counts, int N, int d, int n, void* stream);
// Straight-through gradient gz [N, n] from grad_code g [N, n]: ste 0: g·(1 − g); 1: g (a copy);
// 2: g·σ(z)(1 − σ(z)) with z = x·Wᵀ + b recomputed tile by tile (never stored).
const char* ste_grad(DType dt, int ste, const void* g, const void* x, const void* weight, const void* bias,
                     void* gz, int N, int d, int n, void* stream);

// ---------------------------------------------------------------- covariance penalty
// value (a dt scalar) = Σ_{i≠j} |C_ij| of h [B, n] with C the unbiased covariance; grad [B, n]
// (dt, nullptr: not computed) = d value / dh. Binary h (every element 0 or 1, detected on the
// device) runs on bf16/fp16 tensor cores and is exact up to the final division; the workspace
// holds an int8 [n, n] sign matrix when grad is requested.
size_t covariance_workspace_bytes(int64_t B, int64_t n, bool grad);
const char* covariance_penalty(DType dt, const void* h, void* value, void* grad, void* workspace, int B, int n,
                               void* stream);

}  // namespace fastattn::sae_cuda
