// FlashAttention-2-style backward for fp16/bf16 on tensor cores (sm_80+).
//
// Gradients of O = softmax(scale Q K^T) V (masked), with the forward's saved
// lse [B,H,Sq] and delta = rowsum(dO * O) - grad_lse (flash_bwd_preprocess.cu):
//   P  = exp2(S * scale * log2 e - lse * log2 e)     (recomputed, never stored)
//   dV = P^T dO     dP = dO V^T     dS = P * (dP - delta)
//   dK = scale * dS^T Q             dQ = scale * dS K
//
// Kernels (tile shape and warp layout: BwdTraits in kernel_traits.h):
//   flash_bwd_dkdv_kernel: one block per (64-key K/V tile, KV head, batch). K and
//     V stay in shared memory; the block walks every (query head of the KV head's
//     group, 64-row query tile) that can see one of its keys, recomputes the
//     S^T / dP^T tile (phase 1), accumulates dV and dK in registers (phase 2) and,
//     unless deterministic, dQ = dS K with fp32 atomicAdd into dq_accum (phase 3).
//     GQA: the group's query heads are summed in registers, no reduction pass.
//   flash_bwd_dq_kernel (deterministic mode): one block per (64-row query tile,
//     head, batch); walks the K/V tiles the tile can see, recomputes phase 1 and
//     accumulates dQ in registers (phase 3), then writes dQ in the input dtype.
//     No atomics anywhere: every sum has a fixed order, so results are bitwise
//     reproducible. Costs a second recompute of S and dP.
//
// Masking (as the forward, block_info.h / mask.h): query i sees key j iff
// j < len_k and lo <= j - i <= hi (causal, window and alignment in one band). The
// dK/dV block of keys [n0, n0 + 64) visits the query tiles holding a query that
// sees one of its keys (BlockInfo::query_tiles); a block at or past len_k (or seen
// by no query) visits none and writes zeros. The dQ kernel visits the key tiles
// of its rows (BlockInfo::key_tiles). Inside a visited tile the element mask runs
// where the tile straddles len_k or a band edge, and in the dK/dV kernel also on
// a partial last query tile. K/V rows at or past len_k and Q/dO rows at or past
// Sq are zero-filled; query rows past Sq get lse2 = +inf so P = 0 there while K is
// finite (against Inf in K their S is 0 * Inf = NaN: hence the mask, which keeps
// them out of dK and dV; their dQ rows are never stored). A
// row with lse = -inf (it saw no key) also gets lse2 = +inf: P = exp2(x - inf) = 0,
// so its gradients are exactly 0, never NaN. A row with lse = NaN (it saw a
// non-finite score) gets P = NaN on the keys it sees, as the reference.
// Variants (variants.h): P and dS use ScoreMap (softcap: dS times the slope
// 1 - tanh^2), dropout regenerates the forward's keep decisions (dV takes P Z,
// dS = P (dP Z - delta)); the sink is in lse, its gradient in the preprocess.
// A band-hidden pair inside a tile the band cuts has P = dS = 0 but still meets the
// tile's mma, where Inf/NaN in that key's k (dQ) or in that query's q or dO (dK,
// dV) would give 0 * Inf = NaN: diagonal tiles check those operands (one barrier
// that replaces an existing one, plus one for K per dK/dV block) and, when they
// hold Inf/NaN, take the row-exact products of mma_pair_visible_only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/flash/block_info.h"
#include "cuda/flash/flash_params.h"
#include "cuda/flash/flash_tile.h"
#include "cuda/flash/kernel_traits.h"
#include "cuda/flash/variants.h"

namespace tfkernels {
namespace flash {
namespace bwd {

constexpr float kLog2e = 1.4426950408889634074f;

// The two ldmatrix x4 lane-address patterns of the forward:
//  pattern 0, row (l % 8) + 8 ((l / 8) % 2), col 8 (l / 16):
//    an A fragment from [m][k] storage (plain), or two B fragments (n0-7, n8-15)
//    from [k][n] storage (.trans; V in the forward).
//  pattern 1, row (l % 8) + 8 (l / 16), col 8 ((l / 8) % 2):
//    two B fragments from [n][k] storage (plain; K in the forward), or an A
//    fragment from [k][m] storage (.trans: matrices (m0-7,k0-7), (m8-15,k0-7),
//    (m0-7,k8-15), (m8-15,k8-15) are stored rows k0-7 / k0-7 / k8-15 / k8-15 at
//    columns m0 / m8 / m0 / m8, and .trans hands thread t A[t/4][2(t%4)..+1]).
struct LaneAddr {
  int r0, c0, r1, c1;
};
__device__ __forceinline__ LaneAddr lane_addr(int lane) {
  LaneAddr a;
  a.r0 = (lane % 8) + 8 * ((lane / 8) % 2);
  a.c0 = 8 * (lane / 16);
  a.r1 = (lane % 8) + 8 * (lane / 16);
  a.c1 = 8 * ((lane / 8) % 2);
  return a;
}

// Per-query statistics of a query tile into shared memory (plain stores: a
// __syncthreads must separate them from the readers).
template <typename Traits>
__device__ __forceinline__ void load_row_stats(float* s_lse2, float* s_delta, const float* lse, const float* delta,
                                               int m0, int seqlen_q, int tid) {
  constexpr float kInf = __builtin_huge_valf();
  if (tid < Traits::kBlockM) {
    const int q = m0 + tid;
    float l2 = kInf;  // rows past Sq: P = 0
    float d = 0.0f;
    if (q < seqlen_q) {
      const float l = lse[q];
      l2 = (l == -kInf) ? kInf : l * kLog2e;
      d = delta[q];
    }
    s_lse2[tid] = l2;
    s_delta[tid] = d;
  }
}

// Phase 1: S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 32 queries,
// then P^T (if kWriteP) and dS^T rounded to 16 bits into sP / sdS [key][query].
// need_mask: the tile holds hidden pairs (keys past len_k, above the causal
// diagonal, or query rows with lse2 = +inf: past Sq or seeing no key); they get
// P = dS = 0 exactly.
template <typename Traits, typename Element, bool kWriteP>
__device__ __forceinline__ void phase1(const Element* sQ, const Element* sdO, const Element* sK, const Element* sV,
                                       const float* s_lse2, const float* s_delta, Element* sP, Element* sdS, int n0,
                                       int m0, const Mask& mask, bool need_mask, const ScoreMap& score_map,
                                       const Dropout& dropout, uint32_t batch_head, int warp, int lane,
                                       const LaneAddr& la) {
  constexpr float kInf = __builtin_huge_valf();
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kPS = Traits::kPStride;
  const int key_w = 16 * (warp % 4);
  const int q_w = 32 * (warp / 4);
  float acc_s[4][4];
  float acc_dp[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc_s[i][j] = 0.0f;
      acc_dp[i][j] = 0.0f;
    }
  }
  // A partial unroll at large head dims keeps the scheduler from hoisting every
  // ldmatrix of the loop (the dQ kernel's 64 accumulator registers spilled at
  // D = 256 with the full unroll).
#pragma unroll(Traits::kHeadDim > 128 ? 4 : Traits::kHeadDim / 16)
  for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk) {
    uint32_t ak[4], av[4];
    cuda::ldmatrix_x4(ak, sK + (key_w + la.r0) * kStride + kk * 16 + la.c0);
    cuda::ldmatrix_x4(av, sV + (key_w + la.r0) * kStride + kk * 16 + la.c0);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      uint32_t b[4];
      cuda::ldmatrix_x4(b, sQ + (q_w + nt * 16 + la.r1) * kStride + kk * 16 + la.c1);
      {
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        cuda::mma_16816<Element>(acc_s[2 * nt], ak, b0);
        cuda::mma_16816<Element>(acc_s[2 * nt + 1], ak, b1);
      }
      cuda::ldmatrix_x4(b, sdO + (q_w + nt * 16 + la.r1) * kStride + kk * 16 + la.c1);
      {
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        cuda::mma_16816<Element>(acc_dp[2 * nt], av, b0);
        cuda::mma_16816<Element>(acc_dp[2 * nt + 1], av, b1);
      }
    }
  }

  score_map.apply(acc_s);  // scores in base-2 units (softcap applied)
  const int g = lane / 4;
  const int tq = lane % 4;
  // Dropout keep decisions, bit 4 nt + 2 r + c, drawn in a rolled loop (unrolled,
  // the 16 Philox calls cost registers the accumulators need).
  uint32_t kept_bits = ~0u;
  if (dropout.on) {
    kept_bits = 0;
#pragma unroll 1
    for (int i = 0; i < 16; ++i) {
      const int query = m0 + q_w + (i / 4) * 8 + 2 * tq + (i % 2);
      const int key = n0 + key_w + g + 8 * ((i / 2) % 2);
      kept_bits |= static_cast<uint32_t>(dropout.keep(batch_head, query, key)) << i;
    }
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int kl = key_w + g + 8 * r;  // local key (row of S^T)
      float p[2], ds[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int ql = q_w + nt * 8 + 2 * tq + c;  // local query (column of S^T)
        const float lse2 = s_lse2[ql];
        const float slope = score_map.slope_of(acc_s[nt][2 * r + c]);  // softcap: d score / d (scale q.k)
        float pv = cuda::exp2_approx(acc_s[nt][2 * r + c] - lse2);
        // dV takes P Z, dP is (dO . v) Z, dS = P (dP - delta): Z = keep / (1 - p).
        float pz = pv;
        float dpz = acc_dp[nt][2 * r + c];
        if (dropout.on) {
          const bool kept = (kept_bits >> (4 * nt + 2 * r + c)) & 1u;
          pz = kept ? pv * dropout.scale : 0.0f;
          dpz = kept ? dpz * dropout.scale : 0.0f;
        }
        float dp = dpz - s_delta[ql];
        if (need_mask) {
          const int key = n0 + kl;
          const int q = m0 + ql;
          // lse2 = +inf marks a query row past Sq (zero-filled: its S is 0 * Inf =
          // NaN against a key holding Inf, and exp2(NaN - inf) is NaN, not 0) or a
          // row that sees no key.
          const bool visible = lse2 != kInf && mask.visible(q, key);
          // Both exactly 0: a hidden pair's dp (Inf in v) or delta (a NaN row) may
          // not be finite, and 0 * (dp - delta) would be NaN.
          if (!visible) {
            pv = 0.0f;
            pz = 0.0f;
            dp = 0.0f;
          }
        }
        p[c] = pz;
        ds[c] = pv * dp * slope;
      }
      const int idx = kl * kPS + q_w + nt * 8 + 2 * tq;
      if (kWriteP) *reinterpret_cast<uint32_t*>(sP + idx) = cuda::pack2<Element>(p[0], p[1]);
      *reinterpret_cast<uint32_t*>(sdS + idx) = cuda::pack2<Element>(ds[0], ds[1]);
    }
  }
}

// Phase 2: dV += P^T dO and dK += dS^T Q for this warp's 16 keys and head-dim
// half (kNTilesHalfD n8 tiles from column (warp / 4) * kHeadDim / 2).
// exact: the tile straddles the causal diagonal and its Q or dO holds Inf/NaN;
// each key then sums only the queries that see it (mma_pair_visible_only).
template <typename Traits, typename Element>
__device__ __forceinline__ void phase2(const Element* sQ, const Element* sdO, const Element* sP, const Element* sdS,
                                       float (&acc_dk)[Traits::kNTilesHalfD][4],
                                       float (&acc_dv)[Traits::kNTilesHalfD][4], int warp, const LaneAddr& la,
                                       bool exact, int n0, int m0, const Mask& mask, int lane) {
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kPS = Traits::kPStride;
  constexpr int kNT = Traits::kNTilesHalfD;
  const int key_w = 16 * (warp % 4);
  const int d_w = (warp / 4) * (Traits::kHeadDim / 2);
  // Not unrolled at D = 256: 128 accumulator registers leave no room to hoist
  // the next step's loads (sm_90a spilled 4 bytes).
#pragma unroll(Traits::kHeadDim > 224 ? 1 : Traits::kBlockM / 16)
  for (int kk = 0; kk < Traits::kBlockM / 16; ++kk) {
    uint32_t ap[4], ads[4];
    cuda::ldmatrix_x4(ap, sP + (key_w + la.r0) * kPS + kk * 16 + la.c0);
    cuda::ldmatrix_x4(ads, sdS + (key_w + la.r0) * kPS + kk * 16 + la.c0);
#pragma unroll
    for (int dt = 0; dt < kNT / 2; ++dt) {
      uint32_t b[4];
      // Rows of the products are keys n0 + key_w + r, k the queries m0 + kk * 16 + ....
      const Band sees = mask.key_rows(n0 + key_w);
      cuda::ldmatrix_x4_trans(b, sdO + (kk * 16 + la.r0) * kStride + d_w + dt * 16 + la.c0);
      if (exact) {
        mma_pair_visible_only<Element>(acc_dv[2 * dt], acc_dv[2 * dt + 1], ap, b, m0 + kk * 16, lane, sees);
      } else {
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        cuda::mma_16816<Element>(acc_dv[2 * dt], ap, b0);
        cuda::mma_16816<Element>(acc_dv[2 * dt + 1], ap, b1);
      }
      cuda::ldmatrix_x4_trans(b, sQ + (kk * 16 + la.r0) * kStride + d_w + dt * 16 + la.c0);
      if (exact) {
        mma_pair_visible_only<Element>(acc_dk[2 * dt], acc_dk[2 * dt + 1], ads, b, m0 + kk * 16, lane, sees);
      } else {
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        cuda::mma_16816<Element>(acc_dk[2 * dt], ads, b0);
        cuda::mma_16816<Element>(acc_dk[2 * dt + 1], ads, b1);
      }
    }
  }
}

// Phase 3: acc += dS K for this warp's 16 queries (16 (warp % 4) ..) and kNT n8
// tiles of the head dim from column d0 (unscaled; the caller applies scale).
// exact: the tile straddles the causal diagonal and its K holds Inf/NaN; each
// query then sums only the keys it sees (mma_pair_visible_only).
template <typename Traits, typename Element, int kNT>
__device__ __forceinline__ void phase3(const Element* sdS, const Element* sK, float (&acc)[kNT][4], int d0, int warp,
                                       const LaneAddr& la, bool exact, int n0, int m0, const Mask& mask, int lane) {
  static_assert(kNT % 2 == 0, "n8 tiles come in pairs");
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kPS = Traits::kPStride;
  const int q_w = 16 * (warp % 4);
#pragma unroll
  for (int kk = 0; kk < Traits::kBlockN / 16; ++kk) {
    uint32_t a[4];
    cuda::ldmatrix_x4_trans(a, sdS + (kk * 16 + la.r1) * kPS + q_w + la.c1);
#pragma unroll
    for (int dt = 0; dt < kNT / 2; ++dt) {
      uint32_t b[4];
      cuda::ldmatrix_x4_trans(b, sK + (kk * 16 + la.r0) * kStride + d0 + dt * 16 + la.c0);
      if (exact) {
        // Rows are queries m0 + q_w + r, k the keys n0 + kk * 16 + ....
        mma_pair_visible_only<Element>(acc[2 * dt], acc[2 * dt + 1], a, b, n0 + kk * 16, lane,
                                       mask.query_rows(m0 + q_w));
      } else {
        const uint32_t b0[2] = {b[0], b[1]};
        const uint32_t b1[2] = {b[2], b[3]};
        cuda::mma_16816<Element>(acc[2 * dt], a, b0);
        cuda::mma_16816<Element>(acc[2 * dt + 1], a, b1);
      }
    }
  }
}

// Two adjacent output elements (columns col, col + 1) of a contiguous 16-bit row;
// pair_ok (head_dim even) allows one 4-byte store.
template <typename Element>
__device__ __forceinline__ void store_pair(Element* row, int col, float a, float b, int head_dim, bool pair_ok) {
  if (col >= head_dim) return;
  const uint32_t packed = cuda::pack2<Element>(a, b);
  if (pair_ok) {
    *reinterpret_cast<uint32_t*>(row + col) = packed;
  } else {
    uint16_t* r16 = reinterpret_cast<uint16_t*>(row);
    r16[col] = static_cast<uint16_t>(packed & 0xffffu);
    if (col + 1 < head_dim) r16[col + 1] = static_cast<uint16_t>(packed >> 16);
  }
}

}  // namespace bwd

template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_dkdv_kernel(const __grid_constant__ BwdParams params) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kNT = Traits::kNTilesHalfD;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Element* sK = smem + Traits::kOffFixed;  // fixed: K, V
  Element* sV = sK + Traits::kTileElems;
  Element* sQ = smem + Traits::kOffStream;  // streamed: Q, dO (stage s at + s * kStreamStageElems)
  Element* sdO = sQ + Traits::kTileElems;
  Element* sP = smem + Traits::kOffP;
  Element* sdS = smem + Traits::kOffDS;
  float* s_lse2 = reinterpret_cast<float*>(smem + Traits::kElems16);
  float* s_delta = s_lse2 + kStages * kBlockM;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int n_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int n0 = n_block * kBlockN;
  const int head_dim = params.head_dim;
  const bool aligned16 = params.aligned16;
  const int group = params.head_group;

  const BlockInfo info(params, batch);
  const int seqlen_q = info.seqlen_q;
  // Packed batches: the grid covers the longest sequence's keys; blocks past this
  // one's keys own no rows of dK, dV (block-uniform, before any barrier).
  if (n0 >= info.seqlen_k) return;
  const Mask& mask = info.mask;
  const int len_k = info.len_k();
  // Query tiles holding a query that sees a key of [n0, n0 + kBlockN).
  const TileRange m_tiles = info.query_tiles(n0, n0 + kBlockN, kBlockM);
  const int m_begin = m_tiles.begin;
  const int n_m = m_tiles.count();
  const int n_iter = n_m * group;

  float acc_dk[kNT][4];
  float acc_dv[kNT][4];
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc_dk[i][j] = 0.0f;
      acc_dv[i][j] = 0.0f;
    }
  }

  const bwd::LaneAddr la = bwd::lane_addr(lane);
  const int g = lane / 4;
  const int tq = lane % 4;
  const int d_w = (warp / 4) * (Traits::kHeadDim / 2);

  if (n_iter > 0) {
    const Element* k_ptr = static_cast<const Element*>(params.k) +
                           info.k_offset(params.k_batch_stride, params.k_row_stride) + kv_head * params.k_head_stride;
    const Element* v_ptr = static_cast<const Element*>(params.v) +
                           info.k_offset(params.v_batch_stride, params.v_row_stride) + kv_head * params.v_head_stride;
    const ScoreMap score_map = ScoreMap::base2(params);
    const Dropout dropout = Dropout::make(params);

    // Issues the copies of iteration `it`'s Q / dO tile and statistics into `stage`.
    auto load_q_tile = [&](int it, int stage) {
      const int head = kv_head * group + it / n_m;
      const int m0 = (m_begin + it % n_m) * kBlockM;
      const Element* q_ptr = static_cast<const Element*>(params.q) +
                             info.q_offset(params.q_batch_stride, params.q_row_stride) + head * params.q_head_stride;
      const Element* do_ptr = static_cast<const Element*>(params.dout) +
                              info.q_offset(params.do_batch_stride, params.do_row_stride) + head * params.do_head_stride;
      load_tile<Traits, kBlockM>(sQ + stage * Traits::kStreamStageElems, q_ptr, params.q_row_stride, m0, seqlen_q,
                                 head_dim, aligned16, tid);
      load_tile<Traits, kBlockM>(sdO + stage * Traits::kStreamStageElems, do_ptr, params.do_row_stride, m0, seqlen_q,
                                 head_dim, aligned16, tid);
      const int64_t row_base = info.stats_offset(params, head);
      bwd::load_row_stats<Traits>(s_lse2 + stage * kBlockM, s_delta + stage * kBlockM, params.lse + row_base,
                                  params.delta + row_base, m0, seqlen_q, tid);
    };

    load_tile<Traits, kBlockN>(sK, k_ptr, params.k_row_stride, n0, len_k, head_dim, aligned16, tid);
    load_tile<Traits, kBlockN>(sV, v_ptr, params.v_row_stride, n0, len_k, head_dim, aligned16, tid);
    load_q_tile(0, 0);
    cuda::cp_async_commit();

    bool k_nonfinite = false;  // the block's K holds Inf/NaN (checked once, banded masks only)
    for (int it = 0; it < n_iter; ++it) {
      // One stage: tile it was issued during tile it-1's phase 3 (below).
      cuda::cp_async_wait<0>();
      __syncthreads();  // tile it has landed for all; all are done with tile it-1
      if (it == 0 && mask.banded()) k_nonfinite = __syncthreads_or(tile_nonfinite_share<Traits, kBlockN>(sK, tid));
      if (kStages == 2 && it + 1 < n_iter) {
        load_q_tile(it + 1, (it + 1) % 2);
        cuda::cp_async_commit();
      }
      const int stage = kStages == 2 ? it % 2 : 0;
      const int head = kv_head * group + it / n_m;
      const int m0 = (m_begin + it % n_m) * kBlockM;
      const Element* sQs = sQ + stage * Traits::kStreamStageElems;
      const Element* sdOs = sdO + stage * Traits::kStreamStageElems;
      // A partial last query tile is masked too: its zero-filled rows past Sq meet
      // every key of the block in the dK, dV sums (NaN P or dS there would become
      // NaN * 0 = NaN in them).
      const bool need_mask = !mask.all_visible(m0, m0 + kBlockM, n0, n0 + kBlockN) || m0 + kBlockM > seqlen_q;

      bwd::phase1<Traits, Element, true>(sQs, sdOs, sK, sV, s_lse2 + stage * kBlockM, s_delta + stage * kBlockM, sP,
                                         sdS, n0, m0, mask, need_mask, score_map, dropout,
                                         static_cast<uint32_t>(batch) * params.heads + head, warp, lane, la);
      // Tiles the band cuts carry hidden pairs; with Inf/NaN in Q or dO (dK, dV)
      // or K (dQ) they take the row-exact products. Block-uniform test.
      const bool diagonal = mask.band_cuts(m0, m0 + kBlockM, n0, n0 + kBlockN);
      bool qdo_nonfinite = false;
      if (diagonal) {
        qdo_nonfinite = __syncthreads_or(tile_nonfinite_share<Traits, kBlockM>(sQs, tid) ||
                                         tile_nonfinite_share<Traits, kBlockM>(sdOs, tid));  // and P^T, dS^T complete
      } else {
        __syncthreads();  // P^T and dS^T complete
      }
      bwd::phase2<Traits, Element>(sQs, sdOs, sP, sdS, acc_dk, acc_dv, warp, la, qdo_nonfinite, n0, m0, mask, lane);
      if (kStages == 1 && it + 1 < n_iter) {
        // Q, dO and the statistics of tile it are dead once every warp is past
        // phase 2 (phase 3 reads only dS^T and K): load tile it+1 under phase 3.
        __syncthreads();
        load_q_tile(it + 1, 0);
        cuda::cp_async_commit();
      }

      if (!params.deterministic) {
        // dQ[m0.., :] += dS K into the fp32 accumulator, in chunks of n8 tiles to
        // bound the registers next to the dK/dV accumulators.
        constexpr int kChunk = (kNT % 4 == 0) ? 4 : 2;
        float* dqa = params.dq_accum + info.q_offset(params.dq_batch_stride, params.dq_row_stride) +
                     head * params.dq_head_stride;
        const int q_w = 16 * (warp % 4);
#pragma unroll
        for (int c = 0; c < kNT / kChunk; ++c) {
          float acc[kChunk][4];
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
          }
          const int dc = d_w + c * kChunk * 8;
          bwd::phase3<Traits, Element, kChunk>(sdS, sK, acc, dc, warp, la, diagonal && k_nonfinite, n0, m0, mask,
                                               lane);
#pragma unroll
          for (int nt = 0; nt < kChunk; ++nt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int row = m0 + q_w + g + 8 * (j / 2);
              const int col = dc + nt * 8 + 2 * tq + (j % 2);
              if (row < seqlen_q && col < head_dim) {
                atomicAdd(dqa + static_cast<int64_t>(row) * params.dq_row_stride + col, acc[nt][j]);
              }
            }
          }
        }
      }
    }
  }

  // ---- epilogue: dK = scale * acc_dk, dV = acc_dv for keys < Sk (zeros past len_k).
  const int seqlen_k = info.seqlen_k;
  const float scale = params.scale;
  const bool pair_ok = head_dim % 2 == 0;
  const int64_t kv_base = info.k_offset(params.dk_batch_stride, params.dk_row_stride) + kv_head * params.dk_head_stride;
  Element* dk_ptr = static_cast<Element*>(params.dk) + kv_base;
  Element* dv_ptr = static_cast<Element*>(params.dv) + kv_base;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + 16 * (warp % 4) + g + 8 * r;
    if (key < seqlen_k) {
      Element* dk_row = dk_ptr + static_cast<int64_t>(key) * params.dk_row_stride;
      Element* dv_row = dv_ptr + static_cast<int64_t>(key) * params.dk_row_stride;
      // A key past len_k is seen by no query: its sums are 0 * (q, dO rows), which
      // is NaN where such a row holds Inf/NaN, so it is written as 0 outright.
      const bool seen = key < len_k;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int col = d_w + nt * 8 + 2 * tq;
        bwd::store_pair(dk_row, col, seen ? acc_dk[nt][2 * r] * scale : 0.0f,
                        seen ? acc_dk[nt][2 * r + 1] * scale : 0.0f, head_dim, pair_ok);
        bwd::store_pair(dv_row, col, seen ? acc_dv[nt][2 * r] : 0.0f, seen ? acc_dv[nt][2 * r + 1] : 0.0f, head_dim,
                        pair_ok);
      }
    }
  }
}

// Deterministic dQ: one block per (64-row query tile, head, batch).
template <typename Traits, typename Element>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_dq_kernel(const __grid_constant__ BwdParams params) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kNT = Traits::kNTilesHalfD;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Element* sQ = smem + Traits::kOffFixed;  // fixed: Q, dO
  Element* sdO = sQ + Traits::kTileElems;
  Element* sK = smem + Traits::kOffStream;  // streamed: K, V (stage s at + s * kStreamStageElems)
  Element* sV = sK + Traits::kTileElems;
  Element* sdS = smem + Traits::kOffDS;
  float* s_lse2 = reinterpret_cast<float*>(smem + Traits::kElems16);
  float* s_delta = s_lse2 + kStages * kBlockM;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  // Causal: later query tiles see more keys; launch them first.
  const int m_block = params.causal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / params.head_group;
  const int m0 = m_block * kBlockM;
  const int head_dim = params.head_dim;
  const bool aligned16 = params.aligned16;

  const BlockInfo info(params, batch);
  const int seqlen_q = info.seqlen_q;
  if (m0 >= seqlen_q) return;  // packed batches: past this sequence's end (block-uniform)
  const Mask& mask = info.mask;
  const int len_k = info.len_k();
  const int row_end = (m0 + kBlockM < seqlen_q) ? m0 + kBlockM : seqlen_q;
  const TileRange tiles = info.key_tiles(m0, row_end, kBlockN);
  const int n_tiles = tiles.count();

  float acc[kNT][4];
#pragma unroll
  for (int i = 0; i < kNT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  const bwd::LaneAddr la = bwd::lane_addr(lane);
  const int d_w = (warp / 4) * (Traits::kHeadDim / 2);

  if (n_tiles > 0) {
    const Element* q_ptr = static_cast<const Element*>(params.q) +
                           info.q_offset(params.q_batch_stride, params.q_row_stride) + head * params.q_head_stride;
    const Element* do_ptr = static_cast<const Element*>(params.dout) +
                            info.q_offset(params.do_batch_stride, params.do_row_stride) + head * params.do_head_stride;
    const Element* k_ptr = static_cast<const Element*>(params.k) +
                           info.k_offset(params.k_batch_stride, params.k_row_stride) + kv_head * params.k_head_stride;
    const Element* v_ptr = static_cast<const Element*>(params.v) +
                           info.k_offset(params.v_batch_stride, params.v_row_stride) + kv_head * params.v_head_stride;
    const ScoreMap score_map = ScoreMap::base2(params);
    const Dropout dropout = Dropout::make(params);
    const uint32_t batch_head = static_cast<uint32_t>(batch) * params.heads + head;
    auto load_kv_tile = [&](int it, int stage) {
      const int n1 = (tiles.begin + it) * kBlockN;
      load_tile<Traits, kBlockN>(sK + stage * Traits::kStreamStageElems, k_ptr, params.k_row_stride, n1, len_k, head_dim,
                                 aligned16, tid);
      load_tile<Traits, kBlockN>(sV + stage * Traits::kStreamStageElems, v_ptr, params.v_row_stride, n1, len_k, head_dim,
                                 aligned16, tid);
    };

    load_tile<Traits, kBlockM>(sQ, q_ptr, params.q_row_stride, m0, seqlen_q, head_dim, aligned16, tid);
    load_tile<Traits, kBlockM>(sdO, do_ptr, params.do_row_stride, m0, seqlen_q, head_dim, aligned16, tid);
    const int64_t row_base = info.stats_offset(params, head);
    bwd::load_row_stats<Traits>(s_lse2, s_delta, params.lse + row_base, params.delta + row_base, m0, seqlen_q, tid);
    load_kv_tile(0, 0);
    cuda::cp_async_commit();

    for (int it = 0; it < n_tiles; ++it) {
      if (kStages == 1 && it > 0) {
        __syncthreads();  // every warp is done with K/V tile it-1
        load_kv_tile(it, 0);
        cuda::cp_async_commit();
      }
      cuda::cp_async_wait<0>();
      __syncthreads();
      if (kStages == 2 && it + 1 < n_tiles) {
        load_kv_tile(it + 1, (it + 1) % 2);
        cuda::cp_async_commit();
      }
      const int stage = kStages == 2 ? it % 2 : 0;
      const int n0 = (tiles.begin + it) * kBlockN;
      const Element* sKs = sK + stage * Traits::kStreamStageElems;
      const Element* sVs = sV + stage * Traits::kStreamStageElems;
      // Query rows past Sq need no mask here: their dS rows reach only their own
      // dQ rows, which are never stored.
      const bool need_mask = !mask.all_visible(m0, m0 + kBlockM, n0, n0 + kBlockN);
      bwd::phase1<Traits, Element, false>(sQ, sdO, sKs, sVs, s_lse2, s_delta, nullptr, sdS, n0, m0, mask, need_mask,
                                          score_map, dropout, batch_head, warp, lane, la);
      // As in the dK/dV kernel: a tile the band cuts with Inf/NaN in K takes the row-exact dS K.
      const bool diagonal = mask.band_cuts(m0, m0 + kBlockM, n0, n0 + kBlockN);
      bool k_nonfinite = false;
      if (diagonal) {
        k_nonfinite = __syncthreads_or(tile_nonfinite_share<Traits, kBlockN>(sKs, tid));  // and dS^T complete
      } else {
        __syncthreads();  // dS^T complete
      }
      bwd::phase3<Traits, Element, kNT>(sdS, sKs, acc, d_w, warp, la, k_nonfinite, n0, m0, mask, lane);
    }
  }

  // ---- epilogue: dQ = scale * acc in the input dtype (zeros where nothing is seen).
  const int g = lane / 4;
  const int tq = lane % 4;
  const float scale = params.scale;
  const bool pair_ok = head_dim % 2 == 0;
  Element* dq_ptr = static_cast<Element*>(params.dq) + info.q_offset(params.dq_batch_stride, params.dq_row_stride) +
                    head * params.dq_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + 16 * (warp % 4) + g + 8 * r;
    if (row < seqlen_q) {
      Element* dq_row = dq_ptr + static_cast<int64_t>(row) * params.dq_row_stride;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        bwd::store_pair(dq_row, d_w + nt * 8 + 2 * tq, acc[nt][2 * r] * scale, acc[nt][2 * r + 1] * scale, head_dim,
                        pair_ok);
      }
    }
  }
}

}  // namespace flash
}  // namespace tfkernels
