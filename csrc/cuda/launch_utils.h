// Small helpers shared by CUDA kernel translation units: integer arithmetic for
// launch shapes, 16-byte vector access, and conversions between the storage
// dtypes and the float the math runs in. CUDA headers only (no torch/ATen), so
// any .cu file can include it without paying for the torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace tfkernels {
namespace cuda {

template <typename T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Elements of T per 16-byte vector (LDG.128 / STG.128).
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// True when p is aligned to `bytes` (nullptr counts as aligned: nothing to load).
inline bool is_aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

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

// Storage dtype <-> float. The math of every elementwise kernel runs in float.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A grid-stride loop's grid: enough blocks to cover `work` items, capped so that
// huge tensors reuse blocks instead of exceeding the grid limit. Depends only on
// the problem size, never on the device, so results are reproducible everywhere.
inline unsigned int grid_for(int64_t work, int threads_per_block, int64_t max_blocks = 65535) {
  int64_t blocks = ceil_div<int64_t>(work, threads_per_block);
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned int>(blocks);
}

}  // namespace cuda
}  // namespace tfkernels
