// Which keys a query row of the CPU flash attention sees: one contiguous band
// [kbeg(i), kend(i)) per row, from seqlens_k, the causal mask and the sliding
// window (README, Semantics). Both ends grow monotonically with i, so a block of
// rows sees the keys [kbeg(first row), kend(last row)) and a block of keys is seen
// by one contiguous range of rows: tiles outside the band are never visited.
#pragma once

#include <algorithm>
#include <cstdint>

namespace tfkernels::cpu {

// Half-open range [lo, hi) of a tile's columns (or rows); empty when hi <= lo.
struct Span {
  int64_t lo, hi;
  int64_t size() const { return hi > lo ? hi - lo : 0; }
};

struct Band {
  int64_t seqlen_q, seqlen_k;
  bool bottom_right;
  // Bounds around the diagonal j = i + offset; -1 = unbounded. `right` already
  // includes the causal mask (right = min(right, 0) when causal).
  int64_t left, right;
  const int64_t* lens;  // [B] valid key lengths, or nullptr

  // A window wider than Sq + Sk reaches every key of every row: unbounded (this
  // also keeps i + offset + right from overflowing).
  static Band make(int64_t seqlen_q, int64_t seqlen_k, bool causal, bool bottom_right, int64_t window_left,
                   int64_t window_right, const int64_t* lens) {
    const int64_t reach = seqlen_q + seqlen_k;
    int64_t left = window_left > reach ? -1 : window_left;
    int64_t right = window_right > reach ? -1 : window_right;
    if (causal) right = right < 0 ? 0 : std::min<int64_t>(right, 0);
    return Band{seqlen_q, seqlen_k, bottom_right, left, right, lens};
  }

  int64_t len(int64_t b) const { return lens ? lens[b] : seqlen_k; }
  // The alignment offset of the diagonal (causal mask and window alike).
  int64_t offset(int64_t len_b) const { return bottom_right ? len_b - seqlen_q : 0; }
  int64_t kbeg(int64_t i, int64_t off) const { return left < 0 ? 0 : std::max<int64_t>(0, i + off - left); }
  int64_t kend(int64_t i, int64_t len_b, int64_t off) const {
    return right < 0 ? len_b : std::clamp<int64_t>(i + off + right + 1, 0, len_b);
  }
  bool empty_row(int64_t i, int64_t len_b, int64_t off) const { return kend(i, len_b, off) <= kbeg(i, off); }
  // The keys of [j0, j0 + n) that row i sees, relative to j0.
  Span visible(int64_t i, int64_t len_b, int64_t off, int64_t j0, int64_t n) const {
    return Span{std::clamp<int64_t>(kbeg(i, off) - j0, 0, n), std::clamp<int64_t>(kend(i, len_b, off) - j0, 0, n)};
  }
  // The keys that some row of [i0, i1) sees (i1 > i0).
  Span keys_of_rows(int64_t i0, int64_t i1, int64_t len_b, int64_t off) const {
    return Span{kbeg(i0, off), kend(i1 - 1, len_b, off)};
  }
  // The rows that see some key of [j0, j1), for keys j0 < j1 <= len_b.
  Span rows_of_keys(int64_t j0, int64_t j1, int64_t off) const {
    const int64_t first = right < 0 ? 0 : std::clamp<int64_t>(j0 - off - right, 0, seqlen_q);
    const int64_t last = left < 0 ? seqlen_q : std::clamp<int64_t>(j1 - off + left, 0, seqlen_q);
    return Span{first, last};
  }
};

}  // namespace tfkernels::cpu
