// Split-KV for the forward kernels (flash_attention_kvcache's num_splits): with few
// query tiles (decode: Sq = 1 to a few) a grid of (query tile, head, batch) blocks
// leaves most of the machine idle, so num_splits blocks share one query tile's key
// tiles. Split s walks an equal share of the tiles of BlockInfo::key_tiles and
// writes its rows' partial output O_s (normalised by its own denominator) and
// base-2 lse_s to fp32 scratch (flash_params.h); flash_fwd_split_combine.cu merges
// them: m = max_s lse_s, w_s = 2^(lse_s - m), O = sum_s w_s O_s / sum_s w_s, the
// sink joining the denominator there, once, as RowFinish does unsplit.
//
// A split whose rows saw no key of its share, or only -inf scores, has l = 0: it
// writes O_s = 0 and lse_s = -inf, weight 0. Whether the whole row saw a key (the
// unsplit kernel's test for "output 0, lse -inf" versus NaN) the combine asks the
// mask. A NaN l (NaN or +inf scores) stays NaN in O_s and lse_s and so in the sum.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash/block_info.h"
#include "cuda/flash/flash_params.h"

namespace tfkernels {
namespace flash {

__device__ __forceinline__ int split_count(const FwdParams& p) { return p.num_splits > 1 ? p.num_splits : 1; }

// The forward grid's x index: query tile * splits + split. Causal grids run the
// bottom (heaviest) query tiles first.
struct GridTile {
  int m_block, split;
  __device__ __forceinline__ static GridTile of_block(const FwdParams& p) {
    const int splits = split_count(p);
    const int x = static_cast<int>(blockIdx.x);
    const int tiles = static_cast<int>(gridDim.x) / splits;
    const int t = x / splits;
    return GridTile{p.causal ? tiles - 1 - t : t, x % splits};
  }
};

// Split `split` of `splits`: tiles [begin + split * per, + per) of `all`, per =
// ceil(count / splits); the last splits may get fewer or none.
__device__ __forceinline__ TileRange split_share(TileRange all, int split, int splits) {
  if (splits <= 1) return all;
  const int per = (all.count() + splits - 1) / splits;
  const int begin = all.begin + split * per;
  const int end = begin + per < all.end ? begin + per : all.end;
  return TileRange{begin, end};
}

// One row's partial finish: m the running max (base 2), l the sum of exp2(s - m).
// kExact: correctly rounded reciprocal and log2 (the fp32 kernel).
template <bool kExact>
struct PartialFinish {
  float inv_l, lse2;
  __device__ __forceinline__ PartialFinish(float m, float l) {
    if (l > 0.0f) {
      inv_l = kExact ? __frcp_rn(l) : 1.0f / l;
      lse2 = m + (kExact ? log2f(l) : __log2f(l));
    } else if (l == 0.0f) {
      inv_l = 0.0f;
      lse2 = -__builtin_huge_valf();
    } else {
      inv_l = l;  // NaN
      lse2 = l;
    }
  }
};

// Index of (split, batch, head, row) in lse_accum; times head_dim in o_accum.
__device__ __forceinline__ int64_t partial_index(const FwdParams& p, int split, int batch, int head, int row) {
  return ((static_cast<int64_t>(split) * p.batch + batch) * p.heads + head) * p.seqlen_q + row;
}

}  // namespace flash
}  // namespace tfkernels
