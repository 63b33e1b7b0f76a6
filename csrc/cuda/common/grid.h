// Integer arithmetic of launch shapes and pointer alignment: host code (and
// ceil_div on the device too), CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tfkernels {
namespace cuda {

template <typename T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// A grid-stride loop's grid: enough blocks to cover `work` items, capped so that
// huge tensors reuse blocks instead of exceeding the grid limit. Depends only on
// the problem size, never on the device, so results are reproducible everywhere.
inline unsigned int grid_for(int64_t work, int threads_per_block, int64_t max_blocks = 65535) {
  int64_t blocks = ceil_div<int64_t>(work, threads_per_block);
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned int>(blocks);
}

// True when p is aligned to `bytes` (nullptr counts as aligned: nothing to load).
inline bool is_aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace cuda
}  // namespace tfkernels
