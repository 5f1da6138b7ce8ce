// Circular relative attention, CUDA kernels: tensors -> launcher arguments, allocation and the
// launcher calls. Shared by the real glue (csrc/cuda/circular_relative_attention_glue.cpp, CUDA
// tensors) and the CPU emulator's wrapper (csrc/emu/circular_relative_attention.cpp, CPU
// tensors), so that the emulated tests exercise the glue's checks and plan too.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cra_cuda_launch.h"
#include "cra_problem.h"

namespace fastattn {
namespace cra_cuda {

// Where the kernels run: the device's opt-in shared-memory limit per block and the stream
// (a cudaStream_t; null in emulation). `emulated`: tensors are CPU tensors.
struct Device {
  size_t max_smem;
  void* stream;
  bool emulated;
  int target_blocks = kTargetBlocks;  // tests lower it to run several query tiles per block
};

inline Dtype dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return F32;
    case at::kHalf: return F16;
    case at::kBFloat16: return BF16;
    default: break;
  }
  TORCH_CHECK(false, "circular_relative_attention (cuda): supports float32, float16, bfloat16, got ", s);
  return F32;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Checks (the CPU op's, plus the CUDA kernels' own limits) and the kernels' argument struct.
inline Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                      const at::Tensor& coords, at::IntArrayRef terms, double alpha, double scale, bool causal,
                      const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed, const Device& dev) {
  const CraProblem p = cra_make_problem(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed);
  if (dev.emulated) {
    TORCH_CHECK(q.device().is_cpu(), "cuda backend (emulated): tensors must be on the CPU");
  } else {
    TORCH_CHECK(q.device().is_cuda(), "cuda backend: tensors must be on a CUDA device");
  }
  if (kpm.has_value())  // the kernels dereference it on q's device
    TORCH_CHECK(kpm->device() == q.device(), "key_padding_mask must be on q's device");
  dtype_of(q.scalar_type());
  TORCH_CHECK(p.D % 16 == 0 && p.D >= 16 && p.D <= kMaxD,
              "circular_relative_attention (cuda): head dim must be a multiple of 16 in [16, ", kMaxD, "], got ", p.D);
  TORCH_CHECK((int64_t)p.B * p.H <= 65535, "circular_relative_attention (cuda): batch * heads must be <= 65535");
  Args a{};
  a.B = p.B; a.H = p.H; a.Lq = p.Lq; a.Lk = p.Lk; a.D = p.D; a.N = p.N; a.Ht = p.Ht; a.C = p.C;
  a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.v_sb = v.stride(0); a.v_sh = v.stride(1);
  a.alpha = (float)p.alpha;
  a.scale = (float)p.scale;
  a.keep_scale = (float)(1.0 / (1.0 - p.dropout_p));
  a.causal = p.causal ? 1 : 0;
  a.dropout = p.dropout_p > 0.0 ? 1 : 0;
  a.seed = p.seed;
  a.threshold = p.threshold;
  const char* err = classify_terms(p.terms, a);
  TORCH_CHECK(err == nullptr, err);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.table = table.data_ptr();
  a.coords = coords.data_ptr<int32_t>();
  a.kpm = kpm.has_value() ? reinterpret_cast<const unsigned char*>(kpm->data_ptr<bool>()) : nullptr;
  // 16-byte vector copies need every copied row to start 16-byte aligned (rows are D elements,
  // a multiple of 16, so only the bases and the k/v batch/head strides matter).
  const int64_t per16 = 16 / q.element_size();
  a.vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(table) && a.k_sb % per16 == 0 &&
          a.k_sh % per16 == 0 && a.v_sb % per16 == 0 && a.v_sh % per16 == 0;
  return a;
}

inline Plan make_plan_or_throw(const Args& a, int elem, bool backward, const Device& dev) {
  Plan p{};
  const char* err = make_plan(a, elem, backward, dev.max_smem, p, dev.target_blocks);
  TORCH_CHECK(err == nullptr, err);
  return p;
}

// torch.ops.fastattn.circular_relative_attention: (out [B, H, Lq, D], lse [B, H, Lq] fp32).
inline std::tuple<at::Tensor, at::Tensor> forward_tensors(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table, const at::Tensor& coords,
    at::IntArrayRef terms, double alpha, double scale, bool causal, const std::optional<at::Tensor>& kpm,
    double dropout_p, int64_t seed, const Device& dev) {
  const Args a = make_args(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed, dev);
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto lse = at::empty({a.B, a.H, a.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const Plan p = make_plan_or_throw(a, (int)q.element_size(), false, dev);
  auto ws = at::empty({(int64_t)std::max<size_t>(p.ws_floats, 1)}, q.options().dtype(at::kFloat));
  const char* err = forward(a, p, dtype_of(q.scalar_type()), out.data_ptr(), lse.data_ptr<float>(),
                            ws.data_ptr<float>(), dev.stream);
  TORCH_CHECK(err == nullptr, "circular_relative_attention (cuda) forward: ", err);
  return {out, lse};
}

// torch.ops.fastattn.circular_relative_attention_backward: (dq, dk, dv, dtable).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tensors(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& table, const at::Tensor& coords, at::IntArrayRef terms, double alpha,
    double scale, bool causal, const std::optional<at::Tensor>& kpm, double dropout_p, int64_t seed,
    const Device& dev) {
  Args a = make_args(q, k, v, table, coords, terms, alpha, scale, causal, kpm, dropout_p, seed, dev);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() &&
              lse.sizes() == at::IntArrayRef({a.B, a.H, a.Lq}), "grad_out/out/lse shapes do not match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "circular_relative_attention (cuda): lse must be float32");
  for (const auto* t : {&grad_out, &out, &lse})
    TORCH_CHECK(t->device() == q.device(), "all tensors must be on q's device");
  const auto dout_c = grad_out.contiguous().to(q.scalar_type());
  const auto out_c = out.contiguous().to(q.scalar_type());
  const auto lse_c = lse.contiguous();
  a.vec = a.vec && aligned16(dout_c);
  auto dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto dtable = at::empty(table.sizes(), table.options());
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_(), dtable.zero_()};
  const Plan p = make_plan_or_throw(a, (int)q.element_size(), true, dev);
  auto ws = at::empty({(int64_t)std::max<size_t>(p.ws_floats, 1)}, q.options().dtype(at::kFloat));
  const char* err = backward(a, p, dtype_of(q.scalar_type()), dout_c.data_ptr(), out_c.data_ptr(),
                             lse_c.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dtable.data_ptr(),
                             ws.data_ptr<float>(), dev.stream);
  TORCH_CHECK(err == nullptr, "circular_relative_attention (cuda) backward: ", err);
  return {dq, dk, dv, dtable};
}

}  // namespace cra_cuda
}  // namespace fastattn
