// Which keys a query row of the CPU flash attention sees: one contiguous band
// [kbeg(i), kend(i)) per row of a sequence, from its key length, the causal mask
// and the sliding window (README, Semantics). Both ends grow monotonically with i,
// so a block of rows sees the keys [kbeg(first row), kend(last row)) and a block
// of keys is seen by one contiguous range of rows: tiles outside the band are never
// visited. Band holds the rule (shared by every sequence of a call); SeqBand applies
// it to one sequence's lengths (padded: Sq rows and seqlens_k[b] keys; packed:
// that sequence's own lengths), so the causal offset is per sequence.
#pragma once

#include <algorithm>
#include <cstdint>

namespace tfkernels::cpu {

// Half-open range [lo, hi) of a tile's columns (or rows); empty when hi <= lo.
struct Span {
  int64_t lo, hi;
  int64_t size() const { return hi > lo ? hi - lo : 0; }
};

// The band of one sequence: len_q query rows, len_k visible keys.
struct SeqBand {
  int64_t len_q, len_k;
  int64_t off;          // the diagonal of row i is key i + off
  int64_t left, right;  // bounds around the diagonal, -1 = unbounded (see Band)

  int64_t kbeg(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + off - left); }
  int64_t kend(int64_t i) const { return right < 0 ? len_k : std::clamp<int64_t>(i + off + right + 1, 0, len_k); }
  bool empty_row(int64_t i) const { return kend(i) <= kbeg(i); }
  // The keys of [j0, j0 + n) that row i sees, relative to j0.
  Span visible(int64_t i, int64_t j0, int64_t n) const {
    return Span{std::clamp<int64_t>(kbeg(i) - j0, 0, n), std::clamp<int64_t>(kend(i) - j0, 0, n)};
  }
  // The keys that some row of [i0, i1) sees (i1 > i0).
  Span keys_of_rows(int64_t i0, int64_t i1) const { return Span{kbeg(i0), kend(i1 - 1)}; }
  // The rows that see some key of [j0, j1), for keys j0 < j1 <= len_k.
  Span rows_of_keys(int64_t j0, int64_t j1) const {
    const int64_t first = right < 0 ? 0 : std::clamp<int64_t>(j0 - off - right, 0, len_q);
    const int64_t last = left < 0 ? len_q : std::clamp<int64_t>(j1 - off + left, 0, len_q);
    return Span{first, last};
  }
};

struct Band {
  bool bottom_right;
  // Bounds around the diagonal j = i + offset; -1 = unbounded. `right` already
  // includes the causal mask (right = min(right, 0) when causal).
  int64_t left, right;

  // `reach` bounds every sequence's len_q + len_k: a window wider than that reaches
  // every key of every row, so it is unbounded (which also keeps i + off + right
  // from overflowing).
  static Band make(int64_t reach, bool causal, bool bottom_right, int64_t window_left, int64_t window_right) {
    int64_t left = window_left > reach ? -1 : window_left;
    int64_t right = window_right > reach ? -1 : window_right;
    if (causal) right = right < 0 ? 0 : std::min<int64_t>(right, 0);
    return Band{bottom_right, left, right};
  }

  // The band of a sequence of len_q query rows and len_k visible keys; the
  // alignment offset is 0 (top_left) or len_k - len_q (bottom_right).
  SeqBand of(int64_t len_q, int64_t len_k) const {
    return SeqBand{len_q, len_k, bottom_right ? len_k - len_q : 0, left, right};
  }
};

}  // namespace tfkernels::cpu
