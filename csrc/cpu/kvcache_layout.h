// How the CPU kvcache kernel addresses its tensors: cache rows, dense or paged, and
// the rotary embedding of one head's row. Plain templates over the element type In
// (the tensors' dtype) and the compute type T (float, or double for double).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace tfkernels::cpu::kvcache {

// A cache [B, S_cache, Hkv, D] (dense) or [num_blocks, block_size, Hkv, D] with a block
// table (paged): row `pos` of sequence b, kv head h. Strides in elements; only the last
// dim is contiguous.
template <typename In>
struct CacheView {
  In* p;
  int64_t s0, s1, s2;              // strides of the batch-or-block, row-or-slot and head dims
  const int32_t* table = nullptr;  // paged: block_table, row stride table_stride; dense: nullptr
  int64_t table_stride = 0;
  int64_t block_size = 0;

  In* row(int64_t b, int64_t pos, int64_t h) const {
    if (table == nullptr) return p + b * s0 + pos * s1 + h * s2;
    const int64_t block = table[b * table_stride + pos / block_size];
    return p + block * s0 + (pos % block_size) * s1 + h * s2;
  }
  // How many rows from `pos` on are s1 apart in memory (the rest of pos's block).
  int64_t run(int64_t pos) const {
    return table == nullptr ? std::numeric_limits<int64_t>::max() : block_size - pos % block_size;
  }
};

// A [B, S, H, D] tensor read in place (q, or the new k, v).
template <typename In>
struct RowsView {
  const In* p;
  int64_t s0, s1, s2;
  const In* row(int64_t b, int64_t i, int64_t h) const { return p + b * s0 + i * s1 + h * s2; }
};

// Rotary embedding: cos, sin [seqlen_ro, dim / 2] (row strides given); dim = 0 is off.
// Interleaved (GPT-J) rotates the pairs (2i, 2i+1), else (GPT-NeoX) the pairs (i, i + dim/2),
// both by angle i of the row's position: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos).
template <typename In>
struct Rotary {
  const In* cos = nullptr;
  const In* sin = nullptr;
  int64_t cos_stride = 0, sin_stride = 0;
  int64_t dim = 0;
  bool interleaved = false;
};

// dst[0, D) = src rotated at position `pos` (copied past ro.dim), in the compute type T.
template <typename T, typename In>
inline void rotate_row(const In* src, T* dst, int64_t D, const Rotary<In>& ro, int64_t pos) {
  const int64_t half = ro.dim / 2;
  const In* c = ro.cos + pos * ro.cos_stride;
  const In* s = ro.sin + pos * ro.sin_stride;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = ro.interleaved ? 2 * i : i, b = ro.interleaved ? 2 * i + 1 : i + half;
    const T x1 = static_cast<T>(src[a]), x2 = static_cast<T>(src[b]);
    const T ci = static_cast<T>(c[i]), si = static_cast<T>(s[i]);
    dst[a] = x1 * ci - x2 * si;
    dst[b] = x1 * si + x2 * ci;
  }
  for (int64_t d = ro.dim; d < D; ++d) dst[d] = static_cast<T>(src[d]);
}

template <typename T, typename In>
inline void widen_row(const In* src, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
}

}  // namespace tfkernels::cpu::kvcache
