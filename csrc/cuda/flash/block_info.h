// Per-block bookkeeping of the flash-attention kernels, written once for the
// four of them (16-bit and fp32, forward and backward): the batch entry's visible
// key length, its mask (mask.h: causal offset and window folded into one band),
// and the tile ranges a block walks.
//
// A forward or dQ block owns query rows and walks the key tiles that hold a key
// visible to one of them (key_tiles); a dK/dV block owns keys and walks the query
// tiles that hold a query seeing one of them (query_tiles). Tiles outside the
// ranges are never loaded, so a window costs O(S W), not O(S^2).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash/flash_params.h"
#include "cuda/flash/mask.h"

namespace tfkernels {
namespace flash {

// Tiles [begin, end) of one width; empty when end <= begin.
struct TileRange {
  int begin, end;
  __device__ __forceinline__ int count() const { return end > begin ? end - begin : 0; }
};

struct BlockInfo {
  int seqlen_q;
  Mask mask;

  __device__ __forceinline__ BlockInfo(const FwdParams& p, int batch)
      : seqlen_q(p.seqlen_q),
        mask(Mask::make(read_len_k(p, batch), p.seqlen_q, p.causal, p.bottom_right, p.window_left,
                        p.window_right)) {}

  __device__ __forceinline__ int len_k() const { return mask.len_k; }

  // seqlens_k[batch] clamped to [0, Sk], or Sk without seqlens_k.
  __device__ __forceinline__ static int read_len_k(const FwdParams& p, int batch) {
    if (p.seqlens_k == nullptr) return p.seqlen_k;
    const int64_t len = p.seqlens_k_is_int64
                            ? static_cast<const int64_t*>(p.seqlens_k)[batch]
                            : static_cast<int64_t>(static_cast<const int32_t*>(p.seqlens_k)[batch]);
    return static_cast<int>(len < 0 ? 0 : (len > p.seqlen_k ? p.seqlen_k : len));
  }

  // Key tiles of width block_n holding a key visible to some row of [row_begin,
  // row_end) (row_end <= Sq): the first row's first key to the last row's last.
  __device__ __forceinline__ TileRange key_tiles(int row_begin, int row_end, int block_n) const {
    if (row_begin >= row_end) return TileRange{0, 0};
    const int first = mask.first_key(row_begin);
    const int end = mask.key_end(row_end - 1);
    if (first >= end) return TileRange{0, 0};
    return TileRange{first / block_n, (end + block_n - 1) / block_n};
  }

  // Query tiles of height block_m holding a query that sees some key of
  // [key_begin, key_end): the queries key_begin - hi .. (last key) - lo.
  __device__ __forceinline__ TileRange query_tiles(int key_begin, int key_end, int block_m) const {
    const int last_key = (key_end < mask.len_k ? key_end : mask.len_k) - 1;
    if (key_begin > last_key) return TileRange{0, 0};
    const int first_q = key_begin - mask.hi > 0 ? key_begin - mask.hi : 0;
    const int q_end = last_key - mask.lo + 1 < seqlen_q ? last_key - mask.lo + 1 : seqlen_q;
    if (first_q >= q_end) return TileRange{0, 0};
    return TileRange{first_q / block_m, (q_end + block_m - 1) / block_m};
  }
};

}  // namespace flash
}  // namespace tfkernels
