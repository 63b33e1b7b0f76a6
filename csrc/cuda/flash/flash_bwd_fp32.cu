// fp32 backward: SIMT kernels that keep every operand in fp32 (no 16-bit
// rounding, no TF32), for any head dim up to 256, deterministic by construction
// (no atomics; every sum has a fixed order) whatever `deterministic` says.
//
// One kernel template, two instantiations. A block of 4 warps owns 16 "rows"
// (4 a warp) and walks "column" tiles of 32 (one column a lane):
//   kKeyRows = false (dQ):     rows are queries of one head, columns the keys of
//                              its KV head; acc0 = dQ += dS K.
//   kKeyRows = true  (dK, dV): rows are keys of one KV head, columns the queries
//                              of every head of its group (GQA summed here);
//                              acc0 = dK += dS^T Q, acc1 = dV += P^T dO.
// Per (row, column): s = q.k and dp = dO.v (the column operand is read from
// shared memory rows padded to an odd stride, conflict-free), P = exp(s scale -
// lse) (0 where masked or lse = -inf), dS = P (dp - delta); then the 32 columns'
// P / dS are broadcast by shuffle and each lane accumulates its head-dim columns
// lane + 32 i, over the (row, column) pairs that see each other only (a ballot
// of the visibility skips the rest: 0 * Inf in a hidden q, k or dO would be NaN). Same tile skipping as the 16-bit kernels: key tiles past the last
// visible key, query tiles before the first query that sees the block's first key.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/common/smem_opt_in.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/block_info.h"
#include "cuda/flash/variants.h"

namespace tfkernels {
namespace flash {

namespace {

constexpr int kB32Warps = 4;
constexpr int kB32Threads = kB32Warps * 32;
constexpr int kB32RowsPerWarp = 4;
constexpr int kB32BlockR = kB32Warps * kB32RowsPerWarp;  // 16
constexpr int kB32BlockC = 32;                           // one column per lane
constexpr int kB32ColsPerLane = kMaxHeadDim / 32;        // 8

__host__ __device__ inline int b32_col_stride(int d) { return d | 1; }
__host__ __device__ inline int b32_smem_floats(int d) {
  return 2 * kB32BlockR * d + 2 * kB32BlockC * b32_col_stride(d) + 2 * kB32BlockC;
}

template <bool kKeyRows>
__global__ void __launch_bounds__(kB32Threads, 1) flash_bwd_fp32_kernel(const __grid_constant__ BwdParams p) {
  constexpr float kInf = __builtin_huge_valf();
  extern __shared__ __align__(16) float smem_b32[];
  const int d = p.head_dim;
  const int ks = b32_col_stride(d);
  float* sXr = smem_b32;                 // [16][d]: Q (dQ) or K (dK/dV)
  float* sYr = sXr + kB32BlockR * d;     // [16][d]: dO or V
  float* sXc = sYr + kB32BlockR * d;     // [32][ks]: K or Q
  float* sYc = sXc + kB32BlockC * ks;    // [32][ks]: V or dO
  float* sL = sYc + kB32BlockC * ks;     // [32]: lse of the column queries (kKeyRows)
  float* sD = sL + kB32BlockC;           // [32]: delta of the column queries (kKeyRows)

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int batch = blockIdx.z;
  const int group = p.head_group;
  const BlockInfo info(p, batch);
  const int seqlen_q = info.seqlen_q;
  const Mask& mask = info.mask;
  const int len_k = info.len_k();
  const float scale = p.scale;
  const ScoreMap score_map = ScoreMap::natural(p);
  const Dropout dropout = Dropout::make(p);

  const int block_r = (!kKeyRows && p.causal) ? static_cast<int>(gridDim.x - 1 - blockIdx.x)
                                            : static_cast<int>(blockIdx.x);
  const int r0 = block_r * kB32BlockR;
  const int rw = r0 + warp * kB32RowsPerWarp;  // this warp's first row
  const int head_r = blockIdx.y;                // query head (dQ) or KV head (dK/dV)
  const int kv_head = kKeyRows ? head_r : head_r / group;
  const int row_limit = kKeyRows ? len_k : seqlen_q;  // rows past it are zero
  // Packed batches: the grid covers the longest sequence; blocks past this one's
  // rows have none to write (block-uniform, before any barrier).
  if (r0 >= (kKeyRows ? info.seqlen_k : seqlen_q)) return;

  const float* q_base = static_cast<const float*>(p.q) + info.q_offset(p.q_batch_stride, p.q_row_stride);
  const float* do_base = static_cast<const float*>(p.dout) + info.q_offset(p.do_batch_stride, p.do_row_stride);
  const float* k_ptr =
      static_cast<const float*>(p.k) + info.k_offset(p.k_batch_stride, p.k_row_stride) + kv_head * p.k_head_stride;
  const float* v_ptr =
      static_cast<const float*>(p.v) + info.k_offset(p.v_batch_stride, p.v_row_stride) + kv_head * p.v_head_stride;

  // Column tiles: the key tiles the block's queries see (dQ), or per group head
  // the query tiles that see the block's keys (dK/dV).
  TileRange c_tiles;
  if (kKeyRows) {
    c_tiles = info.query_tiles(r0, r0 + kB32BlockR, kB32BlockC);
  } else {
    const int row_end = (r0 + kB32BlockR < seqlen_q) ? r0 + kB32BlockR : seqlen_q;
    c_tiles = info.key_tiles(r0, row_end, kB32BlockC);
  }
  const int n_ct = c_tiles.count();
  const int n_iter = kKeyRows ? n_ct * group : n_ct;

  float acc0[kB32RowsPerWarp][kB32ColsPerLane];
  float acc1[kB32RowsPerWarp][kB32ColsPerLane];
#pragma unroll
  for (int r = 0; r < kB32RowsPerWarp; ++r) {
#pragma unroll
    for (int i = 0; i < kB32ColsPerLane; ++i) {
      acc0[r][i] = 0.0f;
      acc1[r][i] = 0.0f;
    }
  }
  // Row statistics (dQ: the rows are queries).
  float lse_r[kB32RowsPerWarp], delta_r[kB32RowsPerWarp];
#pragma unroll
  for (int r = 0; r < kB32RowsPerWarp; ++r) {
    lse_r[r] = -kInf;
    delta_r[r] = 0.0f;
    if (!kKeyRows && rw + r < seqlen_q) {
      const int64_t idx = info.stats_offset(p, head_r) + rw + r;
      lse_r[r] = p.lse[idx];
      delta_r[r] = p.delta[idx];
    }
  }

  if (n_iter > 0) {
    const float* xr = kKeyRows ? k_ptr : q_base + head_r * p.q_head_stride;
    const float* yr = kKeyRows ? v_ptr : do_base + head_r * p.do_head_stride;
    const int64_t xr_stride = kKeyRows ? p.k_row_stride : p.q_row_stride;
    const int64_t yr_stride = kKeyRows ? p.v_row_stride : p.do_row_stride;
    for (int r = warp; r < kB32BlockR; r += kB32Warps) {
      const int row = r0 + r;
      const bool ok = row < row_limit;
      for (int c = lane; c < d; c += 32) {
        sXr[r * d + c] = ok ? xr[static_cast<int64_t>(row) * xr_stride + c] : 0.0f;
        sYr[r * d + c] = ok ? yr[static_cast<int64_t>(row) * yr_stride + c] : 0.0f;
      }
    }
  }

  for (int it = 0; it < n_iter; ++it) {
    int head = head_r;  // query head of this column tile
    int c0;
    if (kKeyRows) {
      head = kv_head * group + it / n_ct;
      c0 = (c_tiles.begin + it % n_ct) * kB32BlockC;
    } else {
      c0 = (c_tiles.begin + it) * kB32BlockC;
    }
    const float* xc = kKeyRows ? q_base + head * p.q_head_stride : k_ptr;
    const float* yc = kKeyRows ? do_base + head * p.do_head_stride : v_ptr;
    const int64_t xc_stride = kKeyRows ? p.q_row_stride : p.k_row_stride;
    const int64_t yc_stride = kKeyRows ? p.do_row_stride : p.v_row_stride;
    const int col_limit = kKeyRows ? seqlen_q : len_k;

    __syncthreads();  // every warp is done with the previous column tile (and sXr/sYr are written)
    for (int r = warp; r < kB32BlockC; r += kB32Warps) {
      const int col = c0 + r;
      const bool ok = col < col_limit;
      for (int c = lane; c < d; c += 32) {
        sXc[r * ks + c] = ok ? xc[static_cast<int64_t>(col) * xc_stride + c] : 0.0f;
        sYc[r * ks + c] = ok ? yc[static_cast<int64_t>(col) * yc_stride + c] : 0.0f;
      }
    }
    if (kKeyRows && tid < kB32BlockC) {
      const int q = c0 + tid;
      const int64_t idx = info.stats_offset(p, head) + q;
      sL[tid] = q < seqlen_q ? p.lse[idx] : -kInf;
      sD[tid] = q < seqlen_q ? p.delta[idx] : 0.0f;
    }
    __syncthreads();

    // s and dp for column c0 + lane and the warp's 4 rows.
    float s[kB32RowsPerWarp] = {}, dp[kB32RowsPerWarp] = {};
    const float* xcol = sXc + lane * ks;
    const float* ycol = sYc + lane * ks;
    const float* xrow = sXr + warp * kB32RowsPerWarp * d;
    const float* yrow = sYr + warp * kB32RowsPerWarp * d;
    for (int c = 0; c < d; ++c) {
      const float xv = xcol[c];
      const float yv = ycol[c];
#pragma unroll
      for (int r = 0; r < kB32RowsPerWarp; ++r) {
        s[r] = fmaf(xrow[r * d + c], xv, s[r]);
        dp[r] = fmaf(yrow[r * d + c], yv, dp[r]);
      }
    }
    // Dropout keep decisions (bit r), Philox in a rolled loop.
    uint32_t kept_bits = ~0u;
    if (dropout.on) {
      kept_bits = 0;
      const uint32_t batch_head = static_cast<uint32_t>(batch) * p.heads + head;
#pragma unroll 1
      for (int r = 0; r < kB32RowsPerWarp; ++r) {
        const bool kept = kKeyRows ? dropout.keep(batch_head, c0 + lane, rw + r)   // (query, key)
                                   : dropout.keep(batch_head, rw + r, c0 + lane);
        kept_bits |= static_cast<uint32_t>(kept) << r;
      }
    }
    float pr[kB32RowsPerWarp], dsr[kB32RowsPerWarp];
    uint32_t seen[kB32RowsPerWarp];  // bit j: row r and column c0 + j see each other
#pragma unroll
    for (int r = 0; r < kB32RowsPerWarp; ++r) {
      const int key = kKeyRows ? rw + r : c0 + lane;
      const int q = kKeyRows ? c0 + lane : rw + r;
      const float lse = kKeyRows ? sL[lane] : lse_r[r];
      const float dl = kKeyRows ? sD[lane] : delta_r[r];
      const bool visible = q < seqlen_q && mask.visible(q, key) && lse != -kInf;
      seen[r] = __ballot_sync(0xffffffffu, visible);
      float slope;  // softcap: d score / d (scale q.k)
      const float sc = score_map(s[r], &slope);
      const float pv = visible ? cuda::exp2_approx((sc - lse) * kLog2eF) : 0.0f;
      // dV takes P Z, dP is (dO . v) Z, dS = P (dP - delta): Z = keep / (1 - p).
      float pz = pv, dpz = dp[r];
      if (dropout.on) {
        const bool kept = (kept_bits >> r) & 1u;
        pz = kept ? pv * dropout.scale : 0.0f;
        dpz = kept ? dpz * dropout.scale : 0.0f;
      }
      pr[r] = pz;
      dsr[r] = pv * (dpz - dl) * slope;
    }

    const int cols_here = (col_limit - c0) < kB32BlockC ? (col_limit - c0) : kB32BlockC;
    for (int j = 0; j < cols_here; ++j) {
      float pj[kB32RowsPerWarp], dsj[kB32RowsPerWarp];
#pragma unroll
      for (int r = 0; r < kB32RowsPerWarp; ++r) {
        dsj[r] = __shfl_sync(0xffffffffu, dsr[r], j);
        pj[r] = kKeyRows ? __shfl_sync(0xffffffffu, pr[r], j) : 0.0f;
      }
      const float* xj = sXc + j * ks;
      const float* yj = sYc + j * ks;
#pragma unroll
      for (int i = 0; i < kB32ColsPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < d) {
          const float xv = xj[c];
#pragma unroll
          for (int r = 0; r < kB32RowsPerWarp; ++r) {
            if ((seen[r] >> j) & 1u) acc0[r][i] = fmaf(dsj[r], xv, acc0[r][i]);
          }
          if (kKeyRows) {
            const float yv = yj[c];
#pragma unroll
            for (int r = 0; r < kB32RowsPerWarp; ++r) {
              if ((seen[r] >> j) & 1u) acc1[r][i] = fmaf(pj[r], yv, acc1[r][i]);
            }
          }
        }
      }
    }
  }

  // ---- epilogue (outputs contiguous): zeros where nothing was seen.
  const int out_rows = kKeyRows ? info.seqlen_k : seqlen_q;
  const int64_t out_row_stride = kKeyRows ? p.dk_row_stride : p.dq_row_stride;
  const int64_t base = kKeyRows ? info.k_offset(p.dk_batch_stride, p.dk_row_stride) + head_r * p.dk_head_stride
                                : info.q_offset(p.dq_batch_stride, p.dq_row_stride) + head_r * p.dq_head_stride;
  float* o0 = static_cast<float*>(kKeyRows ? p.dk : p.dq) + base;
  float* o1 = static_cast<float*>(p.dv) + base;
#pragma unroll
  for (int r = 0; r < kB32RowsPerWarp; ++r) {
    const int row = rw + r;
    if (row >= out_rows) break;
#pragma unroll
    for (int i = 0; i < kB32ColsPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) {
        o0[static_cast<int64_t>(row) * out_row_stride + c] = acc0[r][i] * scale;
        if (kKeyRows) o1[static_cast<int64_t>(row) * out_row_stride + c] = acc1[r][i];
      }
    }
  }
}

}  // namespace

cudaError_t run_flash_bwd_fp32(const BwdParams& params, cudaStream_t stream) {
  const int smem = b32_smem_floats(params.head_dim) * static_cast<int>(sizeof(float));
  const int smem_max = b32_smem_floats(kMaxHeadDim) * static_cast<int>(sizeof(float));
  if (smem > 48 * 1024) {
    static cuda::DynamicSmemOptIn opt_in_dq;
    static cuda::DynamicSmemOptIn opt_in_dkdv;
    cudaError_t err = opt_in_dq.apply(flash_bwd_fp32_kernel<false>, smem_max);
    if (err != cudaSuccess) return err;
    err = opt_in_dkdv.apply(flash_bwd_fp32_kernel<true>, smem_max);
    if (err != cudaSuccess) return err;
  }
  if (params.seqlen_q > 0) {
    const dim3 grid((params.seqlen_q + kB32BlockR - 1) / kB32BlockR, params.heads, params.batch);
    flash_bwd_fp32_kernel<false><<<grid, kB32Threads, smem, stream>>>(params);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (params.seqlen_k > 0) {
    const dim3 grid((params.seqlen_k + kB32BlockR - 1) / kB32BlockR, params.kv_heads, params.batch);
    flash_bwd_fp32_kernel<true><<<grid, kB32Threads, smem, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace tfkernels
