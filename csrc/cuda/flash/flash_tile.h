// Global <-> shared tile movement for the 16-bit flash kernels (forward now, the
// backward later): a tile is kRows x Traits::kHeadDim elements in the padded
// layout of kernel_traits.h. Edges are predicated: rows at or past `row_limit`
// and columns at or past `head_dim` are zero-filled, so a padded head dim and a
// partial last tile compute on zeros and never read out of bounds.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common/ptx.h"
#include "cuda/flash/mask.h"  // Band
#include "cuda/flash/paged_kv.h"

namespace tfkernels {
namespace flash {

// Issues the copy of rows [row0, row0 + kRows) into `smem`; row r of the source
// starts at rows(r) (DenseRows or PagedRows of paged_kv.h; rows(r) is asked only
// for r < row_limit). aligned16: 16-byte cp.async per chunk (asynchronous; the
// caller commits and waits). Otherwise element-wise loads and 16-byte shared
// stores (synchronous; for D % 8 != 0 or misaligned rows). Either way a
// __syncthreads() must separate this from reads by other threads.
template <typename Traits, int kRows, typename Element, typename RowMap>
__device__ __forceinline__ void load_tile_rows(Element* smem, const RowMap& rows, int row0, int row_limit,
                                               int head_dim, bool aligned16, int tid) {
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
        const Element* src = ok ? rows(grow) + c * 8 : rows.base;
        cuda::cp_async_16(smem + r * Traits::kSmemStride + c * 8, src, ok);
      }
    }
  } else {
    for (int i = tid; i < kTotal; i += Traits::kNThreads) {
      const int r = i / kChunks;
      const int c = i % kChunks;
      const int grow = row0 + r;
      const bool row_ok = grow < row_limit;
      const uint16_t* src = reinterpret_cast<const uint16_t*>(row_ok ? rows(grow) : rows.base);
      uint16_t e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = c * 8 + j;
        e[j] = (row_ok && col < head_dim) ? src[col] : uint16_t(0);
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

// Rows at a fixed stride: rows [row0, row0 + kRows) of `gmem` (row stride
// `row_stride` elements), rows at or past row_limit zero-filled.
template <typename Traits, int kRows, typename Element>
__device__ __forceinline__ void load_tile(Element* smem, const Element* gmem, int64_t row_stride, int row0,
                                          int row_limit, int head_dim, bool aligned16, int tid) {
  load_tile_rows<Traits, kRows>(smem, DenseRows<Element>{gmem, row_stride}, row0, row_limit, head_dim, aligned16,
                                tid);
}

// A K or V tile of a dense or paged source: the branch is taken once per tile.
template <typename Traits, int kRows, typename Element>
__device__ __forceinline__ void load_kv_tile(Element* smem, const KvRows<Element>& rows, int row0, int row_limit,
                                             int head_dim, bool aligned16, int tid) {
  if (rows.is_paged()) {
    load_tile_rows<Traits, kRows>(smem, rows.paged(), row0, row_limit, head_dim, aligned16, tid);
  } else {
    load_tile_rows<Traits, kRows>(smem, rows.dense(), row0, row_limit, head_dim, aligned16, tid);
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

// ---------------------------------------------------------------- non-finite values

// Whether any of the 8 16-bit values in x is Inf or NaN (exponent bits all ones).
template <typename Element>
__device__ __forceinline__ bool any_nonfinite16x8(uint4 x) {
  constexpr uint32_t kExp = std::is_same<Element, __half>::value ? 0x7C00u : 0x7F80u;  // else bf16
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 4; ++i) bad |= ((w[i] & kExp) == kExp) || (((w[i] >> 16) & kExp) == kExp);
  return bad;
}

// This thread's share of the question "does rows [0, kRows) of a staged tile hold
// an Inf or NaN?"; combine the shares with __syncthreads_or. Rows and columns
// outside the tensor are zero-filled on load, so they never answer yes.
template <typename Traits, int kRows, typename Element>
__device__ __forceinline__ bool tile_nonfinite_share(const Element* smem, int tid) {
  constexpr int kChunks = Traits::kChunksPerRow;
  bool bad = false;
  for (int i = tid; i < kRows * kChunks; i += Traits::kNThreads) {
    bad |= any_nonfinite16x8<Element>(
        *reinterpret_cast<const uint4*>(smem + (i / kChunks) * Traits::kSmemStride + (i % kChunks) * 8));
  }
  return bad;
}

// One m16n8k16 product C += A B in which row r (0..15) of A counts only the k of
// the step that band.sees(r, k): for a hidden (r, k) the B entry is zeroed in that
// row's product. The plain mma would add A[r][k] * B[k] = 0 * Inf = NaN there even
// though A[r][k] = 0, which is why the kernels take this path (16 mma instead of
// 1, so only for tiles that the band (causal diagonal, window edge) cuts and that
// hold an Inf or NaN).
// b is one B fragment as ldmatrix(_trans) gives it: thread t holds k = k0 + 2 (t % 4)
// + {0, 1} in b[0] and the same + 8 in b[1]; its C rows are t / 4 (c[0], c[1]) and
// t / 4 + 8 (c[2], c[3]). One n8 tile at a time and a rolled row loop keep the
// extra registers few (the main loops sit near the 255 limit at large head dims).
template <typename Element>
__device__ __forceinline__ void mma_visible_only(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int k0,
                                                 int lane, Band band) {
  const int g = lane / 4;
  const int k_lo = k0 + 2 * (lane % 4);
#pragma unroll 1
  for (int r = 0; r < 16; ++r) {
    uint32_t bm[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int k = k_lo + 8 * i;
      bm[i] = b[i] & ((band.sees(r, k) ? 0x0000ffffu : 0u) | (band.sees(r, k + 1) ? 0xffff0000u : 0u));
    }
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    cuda::mma_16816<Element>(t, a, bm);
    if (g == r) {
      c[0] += t[0];
      c[1] += t[1];
    }
    if (g + 8 == r) {
      c[2] += t[2];
      c[3] += t[3];
    }
  }
}

// C0 += A B0 and C1 += A B1 over the two n8 halves of an ldmatrix_x4(_trans)
// result (b[0], b[1] and b[2], b[3]), counting visible pairs only.
template <typename Element>
__device__ __forceinline__ void mma_pair_visible_only(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                                      const uint32_t (&b)[4], int k0, int lane, Band band) {
  const uint32_t b0[2] = {b[0], b[1]};
  const uint32_t b1[2] = {b[2], b[3]};
  mma_visible_only<Element>(c0, a, b0, k0, lane, band);
  mma_visible_only<Element>(c1, a, b1, k0, lane, band);
}

}  // namespace flash
}  // namespace tfkernels
