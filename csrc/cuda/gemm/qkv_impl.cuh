// The fused QKV projection on the GEMM core: forward (scatter epilogue) and
// backward (dx and dW GEMMs reading dQKV in head layout, db fused into dW).
// Included once per dtype by qkv_{f16,bf16,f32}.cu.
#pragma once

#include "cuda/gemm/gemm_kernel.cuh"

namespace tfkernels {
namespace cuda {
namespace gemm {

template <typename T>
cudaError_t qkv_forward_impl(const QkvFwdArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  QkvScatterEpilogue<T> ep;
  ep.bias = static_cast<const T*>(a.bias);
  ep.q = static_cast<T*>(a.q);
  ep.k = static_cast<T*>(a.k);
  ep.v = static_cast<T*>(a.v);
  ep.S = a.S;
  ep.H = a.H;
  ep.Hkv = a.Hkv;
  ep.D = a.D;
  ep.div_s = FastDiv(static_cast<uint32_t>(a.S));
  ep.div_d = FastDiv(static_cast<uint32_t>(a.D));
  constexpr Layout K_ = Layout::kInnerK;
  if constexpr (sizeof(T) == 2) {
    if (a.vector_ok)
      return launch_tc_auto<T, K_, K_, false, false, false, /*large*/ true>(a.x, a.w, a.M, a.N, a.K, ep, a.num_sms,
                                                                           a.tile_override, a.max_smem, stream);
    return launch_generic<T, false, K_, K_, false, false, false>(a.x, a.w, a.M, a.N, a.K, ep, stream);
  } else {
    if (a.tf32) return launch_generic<T, true, K_, K_, false, false, false>(a.x, a.w, a.M, a.N, a.K, ep, stream);
    return launch_generic<T, false, K_, K_, false, false, false>(a.x, a.w, a.M, a.N, a.K, ep, stream);
  }
}

// dx = dQKV W      (A = dQKV [tokens, Nqkv] K-contiguous, B = W as [K=Nqkv][N=E])
// dW = dQKV^T x    (A = dQKV^T: M = Nqkv contiguous, K = tokens; B = x as [K=tokens][N=E])
//                  + rowsum(A) = db
template <typename T, bool kTf32, bool kTensorCore>
cudaError_t qkv_backward_run(const QkvBwdArgs& a, cudaStream_t stream) {
  constexpr Layout K_ = Layout::kInnerK, MN = Layout::kInnerMN;
  LinearEpilogue<T, ActNone> ep_dx;
  ep_dx.out = static_cast<T*>(a.dx);
  ep_dx.ldc = a.E;
  LinearEpilogue<T, ActNone> ep_dw;
  ep_dw.out = static_cast<T*>(a.dw);
  ep_dw.ldc = a.E;
  ep_dw.rowsum = static_cast<T*>(a.db);
  cudaError_t err = cudaSuccess;
  if constexpr (kTensorCore) {
    err = launch_tc_auto<T, K_, MN, true, false, false, false>(a.dqkv, a.w, a.tokens, a.E, a.Nqkv, ep_dx, a.num_sms,
                                                                a.tile_override, a.max_smem, stream);
    if (err != cudaSuccess) return err;
    return launch_tc_auto<T, MN, MN, true, false, true, false>(a.dqkv, a.x, a.Nqkv, a.E, a.tokens, ep_dw, a.num_sms,
                                                                a.tile_override, a.max_smem, stream);
  } else {
    err = launch_generic<T, kTf32, K_, MN, true, false, false>(a.dqkv, a.w, a.tokens, a.E, a.Nqkv, ep_dx, stream);
    if (err != cudaSuccess) return err;
    return launch_generic<T, kTf32, MN, MN, true, false, true>(a.dqkv, a.x, a.Nqkv, a.E, a.tokens, ep_dw, stream);
  }
}

template <typename T>
cudaError_t qkv_backward_impl(const QkvBwdArgs& a, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (a.vector_ok) return qkv_backward_run<T, false, true>(a, stream);
    return qkv_backward_run<T, false, false>(a, stream);
  } else {
    if (a.tf32) return qkv_backward_run<T, true, false>(a, stream);
    return qkv_backward_run<T, false, false>(a, stream);
  }
}

}  // namespace gemm
}  // namespace cuda
}  // namespace tfkernels
