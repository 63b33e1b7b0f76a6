// Per-block bookkeeping of the flash-attention kernels, written once for the
// four of them (16-bit and fp32, forward and backward): the batch entry's rows
// (padded, or one sequence of a packed varlen batch), its visible key length, its
// mask (mask.h: causal offset and window folded into one band), the offsets of its
// rows in every tensor, and the tile ranges a block walks.
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

// The rows one batch entry owns in a tensor: padded, all `rows` of its own batch
// index; packed (cu_seqlens), rows cu[b] .. cu[b+1] of the packed tensor, clamped to
// [0, total] so that unvalidated values (CUDA graph capture skips the host check)
// never address outside it.
struct SeqRows {
  int64_t start;  // first row in the packed tensor (0 when padded)
  int len;

  __device__ __forceinline__ static SeqRows of(const int* cu_seqlens, int batch, int total, int rows) {
    if (cu_seqlens == nullptr) return SeqRows{0, rows};
    const int lo = clamp_to(cu_seqlens[batch], 0, total);
    const int hi = clamp_to(cu_seqlens[batch + 1], lo, total);
    return SeqRows{lo, hi - lo};
  }
  __device__ __forceinline__ static int clamp_to(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

struct BlockInfo {
  int batch;
  int seqlen_q;  // query rows of this batch entry (padded: Sq; packed: its length)
  int seqlen_k;  // key rows it owns (padded: Sk, of which len_k() are visible; packed: its length)
  bool packed_q, packed_k;
  int64_t q_start, k_start;  // packed: the entry's first row in q/out and in k/v
  Mask mask;

  __device__ __forceinline__ BlockInfo(const FwdParams& p, int b)
      : BlockInfo(p, b, SeqRows::of(p.cu_seqlens_q, b, p.total_q, p.seqlen_q),
                  SeqRows::of(p.cu_seqlens_k, b, p.total_k, p.seqlen_k)) {}

  __device__ __forceinline__ BlockInfo(const FwdParams& p, int b, SeqRows q, SeqRows k)
      : batch(b),
        seqlen_q(q.len),
        seqlen_k(k.len),
        packed_q(p.cu_seqlens_q != nullptr),
        packed_k(p.cu_seqlens_k != nullptr),
        q_start(q.start),
        k_start(k.start),
        mask(Mask::make(read_len_k(p, b, k.len), q.len, p.causal, p.bottom_right, p.window_left, p.window_right)) {}

  __device__ __forceinline__ int len_k() const { return mask.len_k; }

  // seqlens_k[batch] clamped to [0, rows], or rows without seqlens_k.
  __device__ __forceinline__ static int read_len_k(const FwdParams& p, int batch, int rows) {
    if (p.seqlens_k == nullptr) return rows;
    const int64_t len = p.seqlens_k_is_int64
                            ? static_cast<const int64_t*>(p.seqlens_k)[batch]
                            : static_cast<int64_t>(static_cast<const int32_t*>(p.seqlens_k)[batch]);
    return static_cast<int>(len < 0 ? 0 : (len > rows ? rows : len));
  }

  // Every address of the kernels goes through these three. The offset (in elements)
  // of the entry's row 0 in a tensor of query rows (q, out, dO, dq, dq_accum) or of
  // key rows (k, v, dk, dv): padded, batch * batch_stride; packed, start * row_stride.
  __device__ __forceinline__ int64_t q_offset(int64_t batch_stride, int64_t row_stride) const {
    return packed_q ? q_start * row_stride : static_cast<int64_t>(batch) * batch_stride;
  }
  __device__ __forceinline__ int64_t k_offset(int64_t batch_stride, int64_t row_stride) const {
    return packed_k ? k_start * row_stride : static_cast<int64_t>(batch) * batch_stride;
  }
  // ... of row 0 of (entry, head) in lse, delta and grad_lse: [B,H,Sq] padded,
  // [H,total_q] packed; rows are contiguous.
  __device__ __forceinline__ int64_t stats_offset(const FwdParams& p, int head) const {
    return packed_q ? static_cast<int64_t>(head) * p.total_q + q_start
                    : (static_cast<int64_t>(batch) * p.heads + head) * p.seqlen_q;
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

// The query rows of every batch entry at once, for the passes that treat each row
// alike (delta, the sink gradient, the dq conversion): `batches` x H x `rows`, laid
// out as lse. Padded: B entries of Sq rows. Packed: the total_q rows as one entry
// ([H,total_q] is [1,H,total_q]), which covers every row whatever cu_seqlens hold.
struct AllRows {
  int batches, rows;
  __host__ __device__ __forceinline__ static AllRows of(const FwdParams& p) {
    return p.cu_seqlens_q != nullptr ? AllRows{1, p.total_q} : AllRows{p.batch, p.seqlen_q};
  }
};

}  // namespace flash
}  // namespace tfkernels
