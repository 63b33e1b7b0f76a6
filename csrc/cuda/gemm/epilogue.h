// Epilogue functors of the GEMM core. CUDA headers only.
//
// The interface. A GEMM kernel finishes a tile of fp32 accumulators acc[m][n] and
// calls, for every element it owns, exactly one of
//   store8(row, col0, v[8])   columns col0 .. col0+7, col0 % 8 == 0, all < N
//                             (tensor-core path; the functor may use 16-byte
//                             loads and stores: the launcher guaranteed alignment)
//   store1(row, col, v)       one element (edges of N, and the generic kernel)
// and, in GEMMs instantiated with kRowSum (a row sum of A fused into the main loop,
// e.g. the bias gradient), once per row:
//   store_rowsum(row, sum_k A[row, k])
// row < M and col < N always hold. A functor is a small struct passed by value as a
// kernel parameter; the kernel never knows what "storing" means. Functors here:
//   LinearEpilogue<T, Act>   out[row, col] = Act(acc + bias[col]) in row-major C,
//                            optional `pre` copy of acc + bias (saved for the
//                            backward), optional aux input (dGELU's pre), rowsum.
//     Act = ActNone (bias only / plain GEMM), ActGelu<false|true> (erf | tanh),
//           ActDGelu<false|true>: out = acc * gelu'(aux[row, col])
//   QkvScatterEpilogue<T>    acc + bias written into q [B,H,S,D], k/v [B,Hkv,S,D].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/convert.h"
#include "cuda/common/ptx.h"
#include "cuda/common/vector_io.h"
#include "gelu.h"

namespace tfkernels {
namespace gemm {

using cuda::FastDiv;
using cuda::from_float;
using cuda::load_float8;
using cuda::store_float8;
using cuda::to_float;


// ------------------------------------------------------------------ activations

struct ActNone {
  static constexpr bool kNeedsAux = false;
  __device__ __forceinline__ static float apply(float v, float) { return v; }
};

template <bool kTanh>
struct ActGelu {
  static constexpr bool kNeedsAux = false;
  __device__ __forceinline__ static float apply(float v, float) { return gelu<kTanh>(v); }
};

// Backward through GELU: the GEMM computes grad_out W (the gradient of the hidden
// activation) and the epilogue multiplies by gelu'(pre) read from aux.
template <bool kTanh>
struct ActDGelu {
  static constexpr bool kNeedsAux = true;
  __device__ __forceinline__ static float apply(float v, float pre) { return v * gelu_grad<kTanh>(pre); }
};

// ------------------------------------------------------------------ row-major C

template <typename T, class Act>
struct LinearEpilogue {
  T* out = nullptr;            // [M, ldc]
  int64_t ldc = 0;
  const T* bias = nullptr;     // [N] or null
  T* pre_out = nullptr;        // optional [M, ld_pre]: acc + bias before Act
  int64_t ld_pre = 0;
  const T* aux = nullptr;      // [M, ld_aux] when Act::kNeedsAux
  int64_t ld_aux = 0;
  T* rowsum = nullptr;         // [M] for kRowSum GEMMs

  __device__ __forceinline__ void store8(int row, int col0, float (&v)[8]) const {
    if (bias != nullptr) {
      float b[8];
      load_float8(bias + col0, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += b[i];
    }
    if (pre_out != nullptr) store_float8(pre_out + row * ld_pre + col0, v);
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if constexpr (Act::kNeedsAux) load_float8(aux + row * ld_aux + col0, a);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = Act::apply(v[i], a[i]);
    store_float8(out + row * ldc + col0, v);
  }

  __device__ __forceinline__ void store1(int row, int col, float v) const {
    if (bias != nullptr) v += to_float(bias[col]);
    if (pre_out != nullptr) pre_out[row * ld_pre + col] = from_float<T>(v);
    float a = 0.f;
    if constexpr (Act::kNeedsAux) a = to_float(aux[row * ld_aux + col]);
    out[row * ldc + col] = from_float<T>(Act::apply(v, a));
  }

  __device__ __forceinline__ void store_rowsum(int row, float s) const { rowsum[row] = from_float<T>(s); }
};

// ------------------------------------------------------------------ QKV head scatter

// Column n of the packed projection is head n / D (q heads, then k, then v heads),
// element n % D; row m is token (b, s) = (m / S, m % S). With D % 8 == 0 a vector
// of 8 columns never straddles a head, so store8 writes 16 contiguous bytes of one
// head row; consecutive threads write consecutive vectors of that row.
template <typename T>
struct QkvScatterEpilogue {
  const T* bias = nullptr;  // [N] or null
  T* q = nullptr;           // [B, H, S, D]
  T* k = nullptr;           // [B, Hkv, S, D]
  T* v = nullptr;
  int S = 1, H = 1, Hkv = 1, D = 1;
  FastDiv div_s, div_d;

  __device__ __forceinline__ T* address(int row, int col) const {
    const int b = static_cast<int>(div_s.div(static_cast<uint32_t>(row)));
    const int s = row - b * S;
    int head = static_cast<int>(div_d.div(static_cast<uint32_t>(col)));
    const int d = col - head * D;
    T* base = q;
    int heads = H;
    if (head >= H + Hkv) {
      base = v;
      heads = Hkv;
      head -= H + Hkv;
    } else if (head >= H) {
      base = k;
      heads = Hkv;
      head -= H;
    }
    return base + ((static_cast<int64_t>(b) * heads + head) * S + s) * static_cast<int64_t>(D) + d;
  }

  __device__ __forceinline__ void store8(int row, int col0, float (&v8)[8]) const {
    if (bias != nullptr) {
      float b[8];
      load_float8(bias + col0, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) v8[i] += b[i];
    }
    store_float8(address(row, col0), v8);
  }

  __device__ __forceinline__ void store1(int row, int col, float x) const {
    if (bias != nullptr) x += to_float(bias[col]);
    *address(row, col) = from_float<T>(x);
  }

  __device__ __forceinline__ void store_rowsum(int, float) const {}
};

}  // namespace gemm
}  // namespace tfkernels
