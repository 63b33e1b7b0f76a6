// The fused QKV projection on the GEMM core: forward (scatter epilogue) and
// backward (dx and dW GEMMs reading dQKV in head layout, db fused into dW).
// Included once per dtype by qkv_{fp16,bf16,fp32}.cu. CUDA headers only.
#pragma once

#include "cuda/gemm/epilogue.h"
#include "cuda/gemm/gemm_launch.cuh"

namespace tfkernels {
namespace gemm {

template <typename T>
cudaError_t qkv_forward(const QkvFwdParams& a, cudaStream_t stream) {
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
  using Traits = GemmTraits<T, Layout::kInnerK, Layout::kInnerK, false, false, false, QkvScatterEpilogue<T>>;
  return launch_gemm<Traits, /*kAllowLarge=*/true>(a.x, a.w, a.M, a.N, a.K, ep, a.config, stream);
}

// dx = dQKV W      (A = dQKV [tokens, Nqkv] K-contiguous, B = W as [K=Nqkv][N=E])
// dW = dQKV^T x    (A = dQKV^T: M = Nqkv contiguous, K = tokens; B = x as [K=tokens][N=E])
//                  + rowsum(A) = db
template <typename T>
cudaError_t qkv_backward(const QkvBwdParams& a, cudaStream_t stream) {
  constexpr Layout K_ = Layout::kInnerK, MN = Layout::kInnerMN;
  using Epi = LinearEpilogue<T, ActNone>;
  Epi ep_dx;
  ep_dx.out = static_cast<T*>(a.dx);
  ep_dx.ldc = a.E;
  Epi ep_dw;
  ep_dw.out = static_cast<T*>(a.dw);
  ep_dw.ldc = a.E;
  ep_dw.rowsum = static_cast<T*>(a.db);
  using DxTraits = GemmTraits<T, K_, MN, /*kSegA=*/true, false, false, Epi>;
  using DwTraits = GemmTraits<T, MN, MN, /*kSegA=*/true, false, /*kRowSum=*/true, Epi>;
  const cudaError_t err =
      launch_gemm<DxTraits, false>(a.dqkv, a.w, a.tokens, a.E, a.Nqkv, ep_dx, a.config, stream);
  if (err != cudaSuccess) return err;
  return launch_gemm<DwTraits, false>(a.dqkv, a.x, a.Nqkv, a.E, a.tokens, ep_dw, a.config, stream);
}

}  // namespace gemm
}  // namespace tfkernels
