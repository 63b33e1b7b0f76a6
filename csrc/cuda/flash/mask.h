// Which (query row, key) pairs of one batch entry see each other: the element
// mask of every flash-attention kernel, and the tile tests built on it.
//
// The spec's rule (docs: flash_attention) is: query i sees key j iff
//   j < len_k,  causal -> j <= i + off,  left >= 0 -> j >= i + off - left,
//   right >= 0 -> j <= i + off + right.
// Every bound but len_k limits the difference j - i, so the mask is
//   j < len_k  and  lo <= j - i <= hi
// with lo, hi folded once per block (Mask::make). An unbounded side is
// +-kUnbounded, far enough that no pair of indices below 2^30 reaches it and
// near enough that row + hi + 1 and key - lo stay inside int.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tfkernels {
namespace flash {

constexpr int kUnbounded = (1 << 30) - 1;

// Rows of an mma tile product C[r][.] = sum_k A[r][k] B[k][.] in which row r
// (0..15) counts only the k with k_min + r <= k <= k_max + r (mma_visible_only,
// flash_tile.h). The bounds saturate, so any 64-bit band maps to a valid one.
struct Band {
  int k_min, k_max;
  __host__ __device__ static Band between(int64_t k_min, int64_t k_max) {
    auto sat = [](int64_t x) {
      return static_cast<int>(x < -kUnbounded ? -kUnbounded : (x > kUnbounded ? kUnbounded : x));
    };
    return Band{sat(k_min), sat(k_max)};
  }
  __device__ __forceinline__ bool sees(int r, int k) const { return k >= k_min + r && k <= k_max + r; }
};

struct Mask {
  int len_k;  // keys [0, len_k) exist for this batch entry
  int lo, hi; // j - i must lie in [lo, hi]

  // window_left / window_right: -1 = unbounded (as the op takes them).
  __host__ __device__ static Mask make(int len_k, int seqlen_q, bool causal, bool bottom_right, int window_left,
                                       int window_right) {
    const int64_t off = bottom_right ? static_cast<int64_t>(len_k) - seqlen_q : 0;
    int64_t lo = -kUnbounded, hi = kUnbounded;
    if (causal) hi = off;
    if (window_right >= 0 && off + window_right < hi) hi = off + window_right;
    if (window_left >= 0) lo = off - window_left;
    Mask m;
    m.len_k = len_k;
    m.lo = static_cast<int>(lo < -kUnbounded ? -kUnbounded : lo);
    m.hi = static_cast<int>(hi > kUnbounded ? kUnbounded : hi);
    return m;
  }

  // A band beyond len_k: causal or a window.
  __device__ __forceinline__ bool banded() const { return lo > -kUnbounded || hi < kUnbounded; }

  __device__ __forceinline__ bool visible(int row, int key) const {
    const int d = key - row;
    return key < len_k && d >= lo && d <= hi;
  }

  // Keys [first_key(row), key_end(row)) are the row's visible ones (empty when
  // first_key >= key_end).
  __device__ __forceinline__ int first_key(int row) const { return row + lo > 0 ? row + lo : 0; }
  __device__ __forceinline__ int key_end(int row) const { return row + hi + 1 < len_k ? row + hi + 1 : len_k; }
  __device__ __forceinline__ bool row_sees_a_key(int row) const { return first_key(row) < key_end(row); }

  // Tile tests over rows [r0, r1) and keys [c0, c1). Within the rectangle every
  // difference key - row between c0 - (r1 - 1) and (c1 - 1) - r0 occurs.
  // all_visible: no pair is hidden (the element mask can be left out).
  __device__ __forceinline__ bool all_visible(int r0, int r1, int c0, int c1) const {
    return c1 <= len_k && c1 - 1 - r0 <= hi && c0 - (r1 - 1) >= lo;
  }
  // any_visible: some pair sees each other (else the tile is skipped).
  __device__ __forceinline__ bool any_visible(int r0, int r1, int c0, int c1) const {
    const int c_end = c1 < len_k ? c1 : len_k;
    return c0 < c_end && r0 < r1 && c_end - 1 - r0 >= lo && c0 - (r1 - 1) <= hi;
  }
  // band_cuts: the band (not len_k) hides some pair of existing keys. Such a
  // pair still meets the tile's mma with P = 0, so Inf/NaN in its operands would
  // give 0 * Inf = NaN: the kernels check those tiles' operands (flash_tile.h).
  __device__ __forceinline__ bool band_cuts(int r0, int r1, int c0, int c1) const {
    const int c_end = c1 < len_k ? c1 : len_k;
    return c0 < c_end && r0 < r1 && (c_end - 1 - r0 > hi || c0 - (r1 - 1) < lo);
  }

  // The band of a tile product whose C rows are the queries row0 + r and whose k
  // runs over keys: key in [row + lo, row + hi].
  __device__ __forceinline__ Band query_rows(int row0) const {
    return Band::between(static_cast<int64_t>(row0) + lo, static_cast<int64_t>(row0) + hi);
  }
  // ... whose C rows are the keys key0 + r and whose k runs over queries: query
  // in [key - hi, key - lo].
  __device__ __forceinline__ Band key_rows(int key0) const {
    return Band::between(static_cast<int64_t>(key0) - hi, static_cast<int64_t>(key0) - lo);
  }
};

}  // namespace flash
}  // namespace tfkernels
