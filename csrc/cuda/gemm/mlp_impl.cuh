// The MLP family on the GEMM core: the four GEMM kinds of gemm_args.h (MlpGemmKind)
// and the elementwise dGELU pass. Included once per dtype by mlp_{fp16,bf16,fp32}.cu.
// CUDA headers only.
//
// How the ops use them (csrc/cuda/mlp.cpp builds the sequences; x [M, K], W/W1 [F, K],
// W2 [N, F], all GEMMs C = A B^T of the core):
//
//   linear_gelu      kForward   A = x, B = W, LinearEpilogue<ActGelu>: out = gelu(acc + b),
//                               pre = acc + b when saved
//   fused_mlp        kForward   x W1^T, ActGelu: h = gelu(acc + b1) (temporary), pre
//                    kForward   h W2^T, ActNone: out = acc + b2
//   linear_gelu_bwd  dgelu pass grad_pre = grad_out * gelu'(pre)       (temporary)
//                    kDgrad     dx = grad_pre W
//                    kWgrad     dW = grad_pre^T x, db = row sums of grad_pre^T
//   fused_mlp_bwd    kDgradDGelu grad_pre = (grad_out W2) * gelu'(pre), h = gelu(pre)
//                                (both temporaries, written by one epilogue)
//                    kWgrad     dW2 = grad_out^T h, db2 = column sums of grad_out
//                    kWgrad     dW1 = grad_pre^T x, db1
//                    kDgrad     dx = grad_pre W1
#pragma once

#include <cmath>

#include "cuda/common/convert.h"
#include "cuda/common/grid.h"
#include "cuda/common/vector_io.h"
#include "cuda/gemm/epilogue.h"
#include "cuda/gemm/gemm_launch.cuh"

namespace tfkernels {
namespace gemm {

// gelu(x) and gelu'(x) from one evaluation of erf (or tanh): the formulas of gelu.h.
template <bool kTanh>
__device__ __forceinline__ void gelu_and_grad(float x, float& g, float& dg) {
  using C = GeluConstants<float>;
  if constexpr (kTanh) {
    const float x2 = x * x;
    const float t = std::tanh(C::kSqrt2OverPi * (x + C::kTanhCubic * x2 * x));
    const float half_1pt = 0.5f * (1.f + t);
    g = x * half_1pt;
    dg = half_1pt + 0.5f * x * (1.f - t * t) * (C::kSqrt2OverPi * (1.f + 3.f * C::kTanhCubic * x2));
  } else {
    const float cdf = 0.5f * (1.f + std::erf(x * C::kInvSqrt2));
    const float pdf = C::kInvSqrt2Pi * std::exp(-0.5f * x * x);
    g = x * cdf;
    dg = cdf + x * pdf;
  }
}

// kDgradDGelu's functor: grad_pre = acc * gelu'(pre) and hidden = gelu(pre), both
// row-major, from one read of pre. Writing gelu(pre) here, while pre is in registers,
// saves the separate recompute pass its read of pre (2 bytes per hidden element in
// 16-bit) and its launch.
template <typename T, bool kTanh>
struct DGeluHiddenEpilogue {
  T* grad_pre = nullptr;   // [M, ld_grad]
  int64_t ld_grad = 0;
  T* hidden = nullptr;     // [M, ld_hidden]
  int64_t ld_hidden = 0;
  const T* pre = nullptr;  // [M, ld_pre]
  int64_t ld_pre = 0;

  __device__ __forceinline__ void store8(int row, int col0, float (&v)[8]) const {
    float p[8], h[8];
    load_float8(pre + row * ld_pre + col0, p);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float dg;
      gelu_and_grad<kTanh>(p[i], h[i], dg);
      v[i] *= dg;
    }
    store_float8(grad_pre + row * ld_grad + col0, v);
    store_float8(hidden + row * ld_hidden + col0, h);
  }

  __device__ __forceinline__ void store1(int row, int col, float v) const {
    float h, dg;
    gelu_and_grad<kTanh>(to_float(pre[row * ld_pre + col]), h, dg);
    grad_pre[row * ld_grad + col] = from_float<T>(v * dg);
    hidden[row * ld_hidden + col] = from_float<T>(h);
  }

  __device__ __forceinline__ void store_rowsum(int, float) const {}
};

// One GEMM of the family: operands plain, the main loop chosen by launch_gemm.
template <typename T, Layout LA, Layout LB, bool kRowSum, bool kAllowLarge, class Epi>
cudaError_t mlp_run_gemm(const MlpGemmParams& a, const Epi& ep, cudaStream_t stream) {
  using Traits = GemmTraits<T, LA, LB, false, false, kRowSum, Epi>;
  return launch_gemm<Traits, kAllowLarge>(a.a, a.b, a.M, a.N, a.K, ep, a.config, stream);
}

template <typename T, class Act>
LinearEpilogue<T, Act> mlp_linear_epilogue(const MlpGemmParams& a) {
  LinearEpilogue<T, Act> ep;
  ep.out = static_cast<T*>(a.out);
  ep.ldc = a.ldc;
  ep.bias = static_cast<const T*>(a.bias);
  ep.pre_out = static_cast<T*>(a.pre_out);
  ep.ld_pre = a.ld_pre;
  ep.rowsum = static_cast<T*>(a.rowsum);
  return ep;
}

template <typename T, bool kTanh>
cudaError_t mlp_dgrad_dgelu(const MlpGemmParams& a, cudaStream_t stream) {
  DGeluHiddenEpilogue<T, kTanh> ep;
  ep.grad_pre = static_cast<T*>(a.out);
  ep.ld_grad = a.ldc;
  ep.hidden = static_cast<T*>(a.aux_out);
  ep.ld_hidden = a.ld_aux_out;
  ep.pre = static_cast<const T*>(a.aux);
  ep.ld_pre = a.ld_aux;
  return mlp_run_gemm<T, Layout::kInnerK, Layout::kInnerMN, false, false>(a, ep, stream);
}

template <typename T>
cudaError_t mlp_gemm(const MlpGemmParams& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;  // nothing to store (K == 0 still stores zeros)
  constexpr Layout K_ = Layout::kInnerK, MN = Layout::kInnerMN;
  switch (a.kind) {
    case MlpGemmKind::kForward:
      switch (a.act) {
        case MlpAct::kErf:
          return mlp_run_gemm<T, K_, K_, false, true>(a, mlp_linear_epilogue<T, ActGelu<false>>(a), stream);
        case MlpAct::kTanh:
          return mlp_run_gemm<T, K_, K_, false, true>(a, mlp_linear_epilogue<T, ActGelu<true>>(a), stream);
        default:
          return mlp_run_gemm<T, K_, K_, false, true>(a, mlp_linear_epilogue<T, ActNone>(a), stream);
      }
    case MlpGemmKind::kDgrad:
      return mlp_run_gemm<T, K_, MN, false, false>(a, mlp_linear_epilogue<T, ActNone>(a), stream);
    case MlpGemmKind::kWgrad:
      return mlp_run_gemm<T, MN, MN, true, false>(a, mlp_linear_epilogue<T, ActNone>(a), stream);
    case MlpGemmKind::kDgradDGelu:
      if (a.act == MlpAct::kTanh) return mlp_dgrad_dgelu<T, true>(a, stream);
      if (a.act == MlpAct::kErf) return mlp_dgrad_dgelu<T, false>(a, stream);
      return cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------ dGELU pass

// grad_pre[r, c] = grad_out[r, c] * gelu'(pre[r, c]). Blocks of (TX, 256/TX) threads:
// threadIdx.x walks V-element vectors along a row, threadIdx.y picks the row, both
// grid-strided. A contiguous problem is launched as one row of M*N elements (TX = 256);
// a strided one row by row with TX the smallest power of two >= the vectors of a row
// (32 to 256), so narrow rows do not leave most of a block idle.
struct DGeluGrid {
  int64_t rows = 0, cols = 0;   // cols: elements per row (a multiple of V when vectorised)
  int64_t ld_grad = 0, ld_pre = 0, ld_out = 0;
};

template <typename T, bool kTanh, int V>
__global__ void __launch_bounds__(256)
    mlp_dgelu_kernel(const T* __restrict__ grad_out, const T* __restrict__ pre, T* __restrict__ grad_pre,
                     const DGeluGrid g) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < g.rows; r += row_step) {
    const T* go = grad_out + r * g.ld_grad;
    const T* pr = pre + r * g.ld_pre;
    T* out = grad_pre + r * g.ld_out;
    for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; c < g.cols; c += col_step) {
      if constexpr (V == 8) {
        float a[8], p[8];
        load_float8(go + c, a);
        load_float8(pr + c, p);
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] *= gelu_grad<kTanh>(p[i]);
        store_float8(out + c, a);
      } else {
        out[c] = from_float<T>(to_float(go[c]) * gelu_grad<kTanh>(to_float(pr[c])));
      }
    }
  }
}

template <typename T, bool kTanh, int V>
cudaError_t mlp_dgelu_launch(const MlpDGeluParams& a, cudaStream_t stream) {
  DGeluGrid g;
  const bool flat = (a.M == 1 || (a.ld_grad == a.N && a.ld_pre == a.N));
  g.rows = flat ? 1 : a.M;
  g.cols = flat ? a.M * a.N : a.N;
  g.ld_grad = a.ld_grad;
  g.ld_pre = a.ld_pre;
  g.ld_out = a.N;
  const int64_t vecs = (g.cols + V - 1) / V;
  int tx = 32;
  while (tx < 256 && tx < vecs) tx *= 2;
  const int ty = 256 / tx;
  // Enough blocks for ~16 per SM; the loops stride over the rest.
  const int64_t max_blocks = static_cast<int64_t>(a.config.num_sms > 0 ? a.config.num_sms : 1) * 16;
  int64_t gx = cuda::ceil_div<int64_t>(vecs, tx);
  if (gx > max_blocks) gx = max_blocks;
  int64_t gy = cuda::ceil_div<int64_t>(g.rows, ty);
  const int64_t cap_y = max_blocks / gx > 0 ? max_blocks / gx : 1;
  if (gy > cap_y) gy = cap_y;
  if (gy > 65535) gy = 65535;
  mlp_dgelu_kernel<T, kTanh, V><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty), 0,
                                  stream>>>(static_cast<const T*>(a.grad_out), static_cast<const T*>(a.pre),
                                            static_cast<T*>(a.grad_pre), g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mlp_dgelu(const MlpDGeluParams& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.config.vector_ok) {
    return a.tanh ? mlp_dgelu_launch<T, true, 8>(a, stream) : mlp_dgelu_launch<T, false, 8>(a, stream);
  }
  return a.tanh ? mlp_dgelu_launch<T, true, 1>(a, stream) : mlp_dgelu_launch<T, false, 1>(a, stream);
}

}  // namespace gemm
}  // namespace tfkernels
