// Global <-> shared tile movement for the 16-bit flash kernels (forward now, the
// backward later): a tile is kRows x Traits::kHeadDim elements in the padded
// layout of kernel_traits.h. Edges are predicated: rows at or past `row_limit`
// and columns at or past `head_dim` are zero-filled, so a padded head dim and a
// partial last tile compute on zeros and never read out of bounds.
#pragma once

#include <cstdint>

#include "cuda/common/ptx.h"

namespace tfkernels {
namespace flash {

// Issues the copy of rows [row0, row0 + kRows) of `gmem` (row stride `row_stride`
// elements) into `smem`. aligned16: 16-byte cp.async per chunk (asynchronous; the
// caller commits and waits). Otherwise element-wise loads and 16-byte shared
// stores (synchronous; for D % 8 != 0 or misaligned rows). Either way a
// __syncthreads() must separate this from reads by other threads.
template <typename Traits, int kRows, typename Element>
__device__ __forceinline__ void load_tile(Element* smem, const Element* gmem, int64_t row_stride, int row0,
                                          int row_limit, int head_dim, bool aligned16, int tid) {
  constexpr int kChunks = Traits::kChunksPerRow;
  constexpr int kTotal = kRows * kChunks;
  if (aligned16) {
#pragma unroll
    for (int i0 = 0; i0 < kTotal; i0 += Traits::kNThreads) {
      const int i = i0 + tid;
      if (kTotal % Traits::kNThreads == 0 || i < kTotal) {
        const int r = i / kChunks;
        const int c = i % kChunks;
        const int grow = row0 + r;
        const bool ok = grow < row_limit && c * 8 < head_dim;
        const Element* src = ok ? gmem + static_cast<int64_t>(grow) * row_stride + c * 8 : gmem;
        cuda::cp_async_16(smem + r * Traits::kSmemStride + c * 8, src, ok);
      }
    }
  } else {
    for (int i = tid; i < kTotal; i += Traits::kNThreads) {
      const int r = i / kChunks;
      const int c = i % kChunks;
      const int grow = row0 + r;
      const uint16_t* src = reinterpret_cast<const uint16_t*>(gmem + static_cast<int64_t>(grow) * row_stride);
      uint16_t e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = c * 8 + j;
        e[j] = (grow < row_limit && col < head_dim) ? src[col] : uint16_t(0);
      }
      uint4 packed;
      packed.x = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
      packed.y = uint32_t(e[2]) | (uint32_t(e[3]) << 16);
      packed.z = uint32_t(e[4]) | (uint32_t(e[5]) << 16);
      packed.w = uint32_t(e[6]) | (uint32_t(e[7]) << 16);
      *reinterpret_cast<uint4*>(smem + r * Traits::kSmemStride + c * 8) = packed;
    }
  }
}

// One warp writes 16 rows of a staged tile (padded layout, starting at smem row
// `smem_row0`) to global rows [grow0, grow0 + 16) that are < row_limit, columns
// < head_dim: 16-byte stores when aligned16, element-wise otherwise.
template <typename Traits, typename Element>
__device__ __forceinline__ void store_rows_warp(Element* gmem, int64_t row_stride, const Element* smem,
                                                int smem_row0, int grow0, int row_limit, int head_dim,
                                                bool aligned16, int lane) {
  constexpr int kChunks = Traits::kChunksPerRow;
  constexpr int kTotal = 16 * kChunks;
  static_assert(kTotal % 32 == 0, "16 rows of whole chunks split evenly over a warp");
#pragma unroll
  for (int i0 = 0; i0 < kTotal; i0 += 32) {
    const int i = i0 + lane;
    const int r = i / kChunks;
    const int c = i % kChunks;
    const int grow = grow0 + r;
    if (grow < row_limit && c * 8 < head_dim) {
      const uint4 val = *reinterpret_cast<const uint4*>(smem + (smem_row0 + r) * Traits::kSmemStride + c * 8);
      Element* dst = gmem + static_cast<int64_t>(grow) * row_stride + c * 8;
      if (aligned16) {
        *reinterpret_cast<uint4*>(dst) = val;
      } else {
        const uint32_t w[4] = {val.x, val.y, val.z, val.w};
        uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (c * 8 + j < head_dim) d16[j] = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
        }
      }
    }
  }
}

}  // namespace flash
}  // namespace tfkernels
