// 16-byte vector access to global memory (LDG.128 / STG.128), typed or through
// float. CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/convert.h"
#include "cuda/common/ptx.h"

namespace tfkernels {
namespace cuda {

// Elements of T per 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// N elements of T that load and store as one access of N * sizeof(T) bytes. The
// caller guarantees the address is aligned to sizeof(AlignedVector).
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <typename T, int N>
__device__ __forceinline__ AlignedVector<T, N> load_vector(const T* p) {
  return *reinterpret_cast<const AlignedVector<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vector(T* p, const AlignedVector<T, N>& v) {
  *reinterpret_cast<AlignedVector<T, N>*>(p) = v;
}

// Eight consecutive elements as float, and back (rounded to nearest even); p must be
// 16-byte aligned (one 16-byte access for 16-bit T, two for float).
template <typename T>
__device__ __forceinline__ void load_float8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store_float8(T* p, const float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 raw;
    raw.x = pack2<T>(v[0], v[1]);
    raw.y = pack2<T>(v[2], v[3]);
    raw.z = pack2<T>(v[4], v[5]);
    raw.w = pack2<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

}  // namespace cuda
}  // namespace tfkernels
