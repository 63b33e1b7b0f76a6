// FlashAttention-2-style forward for fp16/bf16 on tensor cores (sm_80+).
//
// One thread block per (query tile of kBlockM rows, head, batch); each of the
// kNWarps warps owns 16 query rows. Per block:
//   1. cp.async Q (kBlockM x D) and K/V tile 0 into shared memory; each warp
//      ldmatrix-es its 16 Q rows into registers (A fragments, kept all kernel).
//   2. For each key tile j in [0, n_tiles): wait for tile j, __syncthreads (which
//      also frees the other stage), issue cp.async of tile j+1 into the other
//      stage, then S = Q K_j^T (mma m16n8k16, K fragments by ldmatrix), scale to
//      base 2, mask (boundary tiles only), online softmax in registers, and
//      O += P V_j (P re-packed from the S accumulators into A fragments, V
//      fragments by ldmatrix.trans).
//   3. O /= l, staged through the warp's own Q rows in shared memory and written
//      with 16-byte stores; lse = (m + log2 l) * ln 2.
//
// KV cache (flash_attention_kvcache): K/V rows may come from a paged cache
// (paged_kv.h: the tile loads map each row through the block table), and with
// num_splits > 1 the grid's x index also picks a share of the key tiles whose
// partial O and lse go to fp32 scratch for the combine kernel (split_kv.h).
//
// Masking (block_info.h, mask.h): query i sees key j iff j < len_k and
// lo <= j - i <= hi, the band that folds causal (hi = off), the window
// (lo = off - left, hi = off + right) and the alignment offset off = 0 (top_left)
// or len_k - Sq (bottom_right), len_k = clamp(seqlens_k[b], 0, Sk) or Sk. A block
// loads only the key tiles between its rows' first and last visible keys; a warp
// skips the compute of a tile its rows cannot see; the mask is evaluated only on
// tiles that straddle len_k or a band edge. K/V rows at or past len_k are
// zero-filled on load, so padding (even NaN) never reaches P V.
// Variants (variants.h): scores go through ScoreMap (scale, or softcap), dropout
// zeroes P after the row sums (lse is pre-dropout) and scales O by 1/(1-p) in the
// epilogue, and RowFinish puts the head's sink into the denominator and lse.
// Rows that see no key end with m = -inf and l = 0: every exponent is guarded so
// they produce O = 0 and lse = -inf, never NaN. Whether a row sees a key comes
// from the mask, never from m or l: a NaN score (from NaN in q or k) leaves m
// finite (fmaxf drops it) but makes l NaN through exp2(NaN) in the sum; a +inf
// score makes exp2(inf - inf) = NaN; visible scores that are all -inf end with
// l = 0. Such rows get O = acc * (1 / l) = NaN and lse = NaN, as the reference.
// A key hidden by the band inside a tile the band cuts would still meet the
// tile's P V mma with P = 0, and 0 * Inf = NaN would reach rows that cannot see
// it: such tiles check their V for Inf/NaN (one extra barrier) and, when found,
// take the row-exact product of mma_pair_visible_only (flash_tile.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/flash/block_info.h"
#include "cuda/flash/flash_params.h"
#include "cuda/flash/flash_tile.h"
#include "cuda/flash/kernel_traits.h"
#include "cuda/flash/paged_kv.h"
#include "cuda/flash/split_kv.h"
#include "cuda/flash/variants.h"

namespace tfkernels {
namespace flash {

// Split-KV epilogue (split_kv.h): rows `row` and row + 8 of this thread's C
// fragments, normalised by their own l, to o_accum in fp32, lse in base 2 to
// lse_accum. (Split-KV never runs with dropout: the kvcache op has none.)
template <int kNTilesO>
__device__ __forceinline__ void write_partial_rows(const FwdParams& params, int split, int batch, int head, int row,
                                                   const float (&acc_o)[kNTilesO][4], const float (&row_max)[2],
                                                   const float (&row_sum)[2], int lane) {
  const int tq = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const PartialFinish<false> fin(row_max[r], cuda::group_sum<4>(row_sum[r]));
    const int i = row + 8 * r;
    if (i >= params.seqlen_q) continue;
    const int64_t index = partial_index(params, split, batch, head, i);
    float* o = params.o_accum + index * params.head_dim;
#pragma unroll
    for (int dt = 0; dt < kNTilesO; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dt * 8 + 2 * tq + e;
        if (col < params.head_dim) o[col] = acc_o[dt][2 * r + e] * fin.inv_l;
      }
    }
    if (tq == 0) params.lse_accum[index] = fin.lse2;
  }
}

template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads, 1) flash_fwd_kernel(const __grid_constant__ FwdParams params) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kNTilesS = kBlockN / 8;     // n8 tiles of S per warp
  constexpr int kKStepsQK = kHeadDim / 16;  // k16 steps of Q K^T
  constexpr int kNTilesO = kHeadDim / 8;    // n8 tiles of O per warp
  constexpr int kKStepsPV = kBlockN / 16;   // k16 steps of P V
  constexpr float kNegInf = -__builtin_huge_valf();

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + Traits::kQTileElems;
  Element* sV = sK + Traits::kStages * Traits::kKVTileElems;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const GridTile grid_tile = GridTile::of_block(params);  // query tile (causal: bottom first) and KV split
  const int m_block = grid_tile.m_block;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / params.head_group;
  const int m0 = m_block * kBlockM;
  const int m0w = m0 + warp * 16;  // first query row of this warp
  const int head_dim = params.head_dim;
  const bool aligned16 = params.aligned16;

  const BlockInfo info(params, batch);
  const int seqlen_q = info.seqlen_q;
  // Packed batches: the grid covers the longest sequence; tiles past this one's end
  // have nothing to do (block-uniform, before any barrier).
  if (m0 >= seqlen_q) return;
  const Mask& mask = info.mask;
  const int len_k = info.len_k();
  const int row_end = (m0 + kBlockM < seqlen_q) ? m0 + kBlockM : seqlen_q;
  const TileRange tiles = split_share(info.key_tiles(m0, row_end, kBlockN), grid_tile.split, split_count(params));
  const int n_tiles = tiles.count();
  const Dropout dropout = Dropout::make(params);
  const uint32_t batch_head = static_cast<uint32_t>(batch) * params.heads + head;

  const Element* q_ptr = static_cast<const Element*>(params.q) +
                         info.q_offset(params.q_batch_stride, params.q_row_stride) + head * params.q_head_stride;
  const KvRows<Element> k_rows =
      KvRows<Element>::make(params, params.k, info.k_offset(params.k_batch_stride, params.k_row_stride),
                            params.k_batch_stride, params.k_head_stride, params.k_row_stride, batch, kv_head);
  const KvRows<Element> v_rows =
      KvRows<Element>::make(params, params.v, info.k_offset(params.v_batch_stride, params.v_row_stride),
                            params.v_batch_stride, params.v_head_stride, params.v_row_stride, batch, kv_head);

  // Accumulators: O (16 rows x kHeadDim per warp), running max m (base-2 scaled
  // scores) and this thread's partial row sum l, for rows g = lane/4 and g + 8.
  float acc_o[kNTilesO][4];
#pragma unroll
  for (int i = 0; i < kNTilesO; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc_o[i][j] = 0.0f;
  }
  float row_max[2] = {kNegInf, kNegInf};
  float row_sum[2] = {0.0f, 0.0f};

  const int g = lane / 4;  // row of the C fragment (and g + 8)
  const int tq = lane % 4; // column pair of the C fragment
  const bool warp_active = m0w < seqlen_q;

  if (n_tiles > 0) {
    // ---- prologue: Q, then K/V tile 0 in stage 0.
    load_tile<Traits, kBlockM>(sQ, q_ptr, params.q_row_stride, m0, seqlen_q, head_dim, aligned16, tid);
    cuda::cp_async_commit();
    load_kv_tile<Traits, kBlockN>(sK, k_rows, tiles.begin * kBlockN, len_k, head_dim, aligned16, tid);
    load_kv_tile<Traits, kBlockN>(sV, v_rows, tiles.begin * kBlockN, len_k, head_dim, aligned16, tid);
    cuda::cp_async_commit();
    cuda::cp_async_wait<1>();
    __syncthreads();

    // ldmatrix x4 address for an A fragment (16x16 at rows r0, cols c0): lane l
    // gives row (l % 8) + 8 * ((l / 8) % 2), column 8 * (l / 16).
    const int a_row = (lane % 8) + 8 * ((lane / 8) % 2);
    const int a_col = 8 * (lane / 16);
    // ldmatrix x4 address for two B fragments of K (keys n0..n0+15, d k0..k0+15):
    // matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15).
    const int kb_row = (lane % 8) + 8 * (lane / 16);
    const int kb_col = 8 * ((lane / 8) % 2);
    // ldmatrix.x4.trans address for two B fragments of V (keys k0..k0+15, d n0..n0+15):
    // matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15).
    const int vb_row = (lane % 8) + 8 * ((lane / 8) % 2);
    const int vb_col = 8 * (lane / 16);

    uint32_t q_frag[Traits::kQInRegs ? kKStepsQK : 1][4];
    if (Traits::kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < (Traits::kQInRegs ? kKStepsQK : 0); ++kk) {
        cuda::ldmatrix_x4(q_frag[kk], sQ + (warp * 16 + a_row) * kStride + kk * 16 + a_col);
      }
    }

    const ScoreMap score_map = ScoreMap::base2(params);

    for (int it = 0; it < n_tiles; ++it) {
      // Tile `it` has landed for every thread, and every warp is done with tile it-1.
      cuda::cp_async_wait<0>();
      __syncthreads();
      if (it + 1 < n_tiles) {
        const int stage = (it + 1) % Traits::kStages;
        const int n1 = (tiles.begin + it + 1) * kBlockN;
        load_kv_tile<Traits, kBlockN>(sK + stage * Traits::kKVTileElems, k_rows, n1, len_k, head_dim, aligned16,
                                      tid);
        load_kv_tile<Traits, kBlockN>(sV + stage * Traits::kKVTileElems, v_rows, n1, len_k, head_dim, aligned16,
                                      tid);
        cuda::cp_async_commit();
      }

      const int n0 = (tiles.begin + it) * kBlockN;
      const Element* sKs = sK + (it % Traits::kStages) * Traits::kKVTileElems;
      const Element* sVs = sV + (it % Traits::kStages) * Traits::kKVTileElems;
      // Rare path: a tile cut by the block's band (causal diagonal, window edge)
      // whose V holds Inf or NaN computes P V row by row over the visible keys
      // (mma_pair_visible_only). The test is block-uniform, so every thread meets
      // the barrier of __syncthreads_or.
      const bool v_nonfinite = mask.band_cuts(m0, m0 + kBlockM, n0, n0 + kBlockN) &&
                               __syncthreads_or(tile_nonfinite_share<Traits, kBlockN>(sVs, tid));
      if (!warp_active || !mask.any_visible(m0w, m0w + 16, n0, n0 + kBlockN)) continue;

      // ---- S = Q K^T (16 x kBlockN per warp, fp32)
      float acc_s[kNTilesS][4];
#pragma unroll
      for (int i = 0; i < kNTilesS; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc_s[i][j] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kKStepsQK; ++kk) {
        uint32_t a[4];
        if (Traits::kQInRegs) {
#pragma unroll
          for (int j = 0; j < 4; ++j) a[j] = q_frag[Traits::kQInRegs ? kk : 0][j];
        } else {
          cuda::ldmatrix_x4(a, sQ + (warp * 16 + a_row) * kStride + kk * 16 + a_col);
        }
#pragma unroll
        for (int nt = 0; nt < kNTilesS / 2; ++nt) {
          uint32_t b[4];
          cuda::ldmatrix_x4(b, sKs + (nt * 16 + kb_row) * kStride + kk * 16 + kb_col);
          const uint32_t b0[2] = {b[0], b[1]};
          const uint32_t b1[2] = {b[2], b[3]};
          cuda::mma_16816<Element>(acc_s[2 * nt], a, b0);
          cuda::mma_16816<Element>(acc_s[2 * nt + 1], a, b1);
        }
      }

      // ---- scale to base 2 (softcap: c log2e tanh(scale s / c)) and mask. The
      // scale is applied before the max so a negative scale stays correct.
      const bool need_mask = !mask.all_visible(m0w, m0w + 16, n0, n0 + kBlockN);
      score_map.apply(acc_s);
      if (need_mask) {
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int col = n0 + nt * 8 + 2 * tq + (j % 2);
            const int row = m0w + g + 8 * (j / 2);
            if (!mask.visible(row, col)) acc_s[nt][j] = kNegInf;
          }
        }
      }

      // ---- online softmax (rows g and g + 8 of the warp's 16)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) mx = fmaxf(mx, fmaxf(acc_s[nt][2 * r], acc_s[nt][2 * r + 1]));
        mx = cuda::group_max<4>(mx);
        // A row that has seen no key yet keeps max -inf: subtract 0 instead, so
        // exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        const float m_use = (mx == kNegInf) ? 0.0f : mx;
        const float alpha = cuda::exp2_approx(row_max[r] - m_use);
        row_max[r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          acc_s[nt][2 * r] = cuda::exp2_approx(acc_s[nt][2 * r] - m_use);
          acc_s[nt][2 * r + 1] = cuda::exp2_approx(acc_s[nt][2 * r + 1] - m_use);
          sum += acc_s[nt][2 * r] + acc_s[nt][2 * r + 1];
        }
        row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < kNTilesO; ++dt) {
          acc_o[dt][2 * r] *= alpha;
          acc_o[dt][2 * r + 1] *= alpha;
        }
      }

      // ---- dropout: the row sums above are pre-dropout (lse is); dropped P are 0
      // in P V, and 1 / (1 - p) is folded into the final normalisation.
      // The Philox calls run in a rolled loop into a bit mask (bit 4 nt + j drops
      // acc_s[nt][j]); unrolled, they cost ~90 registers.
      if (dropout.on) {
        static_assert(kNTilesS <= 8, "4 bits per n8 tile in one 32-bit mask");
        uint32_t dropped = 0;
#pragma unroll 1
        for (int i = 0; i < 2 * kNTilesS; ++i) {  // i = 2 nt + r: rows g + 8 r, keys 2 tq, 2 tq + 1
          const uint32_t kept = dropout.keep_pair(batch_head, m0w + g + 8 * (i % 2), n0 + (i / 2) * 8 + 2 * tq);
          dropped |= (~kept & 3u) << (2 * i);
        }
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if ((dropped >> (4 * nt + j)) & 1u) acc_s[nt][j] = 0.0f;
          }
        }
      }

      // ---- O += P V: the S accumulators of n8 tiles 2k and 2k+1 form the A
      // fragment of k16 step k (rows g/g+8, keys 2*tq.. and 8+2*tq..).
#pragma unroll
      for (int kk = 0; kk < kKStepsPV; ++kk) {
        uint32_t a[4];
        a[0] = cuda::pack2<Element>(acc_s[2 * kk][0], acc_s[2 * kk][1]);
        a[1] = cuda::pack2<Element>(acc_s[2 * kk][2], acc_s[2 * kk][3]);
        a[2] = cuda::pack2<Element>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
        a[3] = cuda::pack2<Element>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
#pragma unroll
        for (int dt = 0; dt < kNTilesO / 2; ++dt) {
          uint32_t b[4];
          cuda::ldmatrix_x4_trans(b, sVs + (kk * 16 + vb_row) * kStride + dt * 16 + vb_col);
          if (v_nonfinite && need_mask) {
            mma_pair_visible_only<Element>(acc_o[2 * dt], acc_o[2 * dt + 1], a, b, n0 + kk * 16, lane,
                                           mask.query_rows(m0w));
          } else {
            const uint32_t b0[2] = {b[0], b[1]};
            const uint32_t b1[2] = {b[2], b[3]};
            cuda::mma_16816<Element>(acc_o[2 * dt], a, b0);
            cuda::mma_16816<Element>(acc_o[2 * dt + 1], a, b1);
          }
        }
      }
    }
  }

  if (split_count(params) > 1) {
    write_partial_rows(params, grid_tile.split, batch, head, m0w + g, acc_o, row_max, row_sum, lane);
    return;
  }

  // ---- epilogue: normalise once (sink, dropout scale), lse, stage through this
  // warp's Q rows, store. Every warp reads and writes only its own 16 rows of sQ
  // (the Q ldmatrix reads above included), so a __syncwarp() orders the staging.
  const float sink = sink_logit(params, head);
  float inv_l[2];
  float lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // l >= 1 when the row's scores are finite (its max contributes exp2(0) = 1); l
    // is NaN or 0 after non-finite scores, and then O and lse are NaN.
    const RowFinish<false> fin(row_max[r], cuda::group_sum<4>(row_sum[r]), mask.row_sees_a_key(m0w + g + 8 * r),
                               sink);
    inv_l[r] = fin.inv_l * dropout.scale;
    lse[r] = fin.lse;
  }
  if (!warp_active) return;
  __syncwarp();
#pragma unroll
  for (int dt = 0; dt < kNTilesO; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t packed = cuda::pack2<Element>(acc_o[dt][2 * r] * inv_l[r], acc_o[dt][2 * r + 1] * inv_l[r]);
      *reinterpret_cast<uint32_t*>(sQ + (warp * 16 + g + 8 * r) * kStride + dt * 8 + 2 * tq) = packed;
    }
  }
  __syncwarp();
  Element* o_ptr = static_cast<Element*>(params.out) + info.q_offset(params.o_batch_stride, params.o_row_stride) +
                   head * params.o_head_stride;
  store_rows_warp<Traits>(o_ptr, params.o_row_stride, sQ, warp * 16, m0w, seqlen_q, head_dim, aligned16, lane);

  if (tq == 0) {
    float* lse_ptr = params.lse + info.stats_offset(params, head);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0w + g + 8 * r;
      if (row < seqlen_q) lse_ptr[row] = lse[r];
    }
  }
}

}  // namespace flash
}  // namespace tfkernels
