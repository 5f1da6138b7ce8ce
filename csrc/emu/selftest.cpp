// Self-test of the CUDA emulator (tests/test_cuda_emu.py): small kernels that exercise each
// feature fa_cuda.h promises, so that a kernel test failing under emulation points at the kernel.
#include <torch/extension.h>

#include "fa_cuda.h"

using namespace nvcuda;

// out[b, 0..5] for each block b of 64 threads over x[b, 0..63]:
//   0: block sum via __shfl_xor_sync + static shared memory
//   1: lane 0's value after a __shfl_down_sync tree (warp 0's sum)
//   2: __shfl_sync broadcast of lane 7 of warp 1, 3: __shfl_up_sync(1) seen by lane 5 of warp 0
//   4: popcount of __ballot_sync(x > 0) over warp 0, 5: sum via atomicAdd on shared memory,
//   6: sum through dynamic shared memory written by threads that stay after others returned.
__global__ void warp_block_kernel(const float* x, float* out) {
  FA_SHARED float partial[2];
  FA_SHARED float atomic_sum;
  FA_DYNAMIC_SMEM(float, dyn);
  const int t = threadIdx.x, lane = t % 32, w = t / 32;
  const float v = x[blockIdx.x * 64 + t];
  float* o = out + blockIdx.x * 8;
  if (t == 0) atomic_sum = 0.f;
  __syncthreads();
  float s = v;
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (lane == 0) partial[w] = s;
  float d = v;
  for (int m = 16; m > 0; m >>= 1) d += __shfl_down_sync(0xffffffffu, d, m);
  const float b7 = __shfl_sync(0xffffffffu, v, 7);
  const float up = __shfl_up_sync(0xffffffffu, v, 1);
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.f);
  atomicAdd(&atomic_sum, v);
  __syncthreads();
  if (t == 0) {
    o[0] = partial[0] + partial[1];
    o[1] = d;
    o[4] = static_cast<float>(__popc(ballot));
  }
  if (t == 32 + 7) o[2] = b7;
  if (t == 5) o[3] = up;
  if (t == 1) o[5] = atomic_sum;
  if (t >= 48) return;  // exited threads must not hold up the barriers below
  dyn[t] = v;
  __syncthreads();
  if (t == 0) {
    float acc = 0.f;
    for (int i = 0; i < 48; ++i) acc += dyn[i];
    o[6] = acc;
  }
}

// c [16, 16] = a [16, 16] · b [16, 16] (b given column-major, i.e. as bᵀ row-major) by one warp.
template <typename T>
__global__ void wmma_kernel(const T* a, const T* bt, float* c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, bt, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

torch::Tensor warp_block(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 64 && x.scalar_type() == torch::kFloat32 && x.is_contiguous());
  auto out = torch::zeros({x.size(0), 8}, x.options());
  FA_LAUNCH(warp_block_kernel, static_cast<unsigned>(x.size(0)), 64, 64 * sizeof(float), nullptr,
            x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

torch::Tensor wmma_matmul(torch::Tensor a, torch::Tensor bt) {
  auto c = torch::empty({16, 16}, a.options().dtype(torch::kFloat32));
  if (a.scalar_type() == torch::kHalf)
    FA_LAUNCH((wmma_kernel<__half>), 1, 32, 0, nullptr, reinterpret_cast<const __half*>(a.data_ptr()),
              reinterpret_cast<const __half*>(bt.data_ptr()), c.data_ptr<float>());
  else
    FA_LAUNCH((wmma_kernel<__nv_bfloat16>), 1, 32, 0, nullptr, reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()),
              reinterpret_cast<const __nv_bfloat16*>(bt.data_ptr()), c.data_ptr<float>());
  return c;
}

// What the hardware would reject must fail here too: a WMMA tile at a misaligned address, and
// more than 48 KB of dynamic shared memory without the opt-in.
void faults(int which) {
  auto a = torch::zeros({64, 16}, torch::kHalf);
  auto c = torch::zeros({16, 16}, torch::kFloat32);
  auto* p = reinterpret_cast<const __half*>(a.data_ptr());
  if (which == 0)
    FA_LAUNCH((wmma_kernel<__half>), 1, 32, 0, nullptr, p + 8, p, c.data_ptr<float>());
  else
    FA_LAUNCH((wmma_kernel<__half>), 1, 32, 64 * 1024, nullptr, p, p, c.data_ptr<float>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("warp_block", &warp_block);
  m.def("wmma_matmul", &wmma_matmul);
  m.def("faults", &faults);
}
