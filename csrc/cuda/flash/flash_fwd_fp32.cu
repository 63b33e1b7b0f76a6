// fp32 forward: a SIMT tiled online-softmax kernel that keeps every operand in
// fp32 (no rounding to 16 bits, no TF32), for any head dim up to 256.
//
// One block of 4 warps per (16 query rows, head, batch); each warp owns 4 query
// rows and processes them together so every K/V element read from shared memory
// is used 4 times. Per 32-key tile (one key per lane):
//   S: lane j computes the 4 dot products q_r . k_j over D (K rows padded to an
//      odd stride: lanes read 32 different rows of one column without bank
//      conflicts; q is a shared-memory broadcast);
//   softmax: base-2 scaled scores, warp max / sum by shuffles, guarded like the
//      tensor-core kernel (a row with no visible key gives O = 0, lse = -inf;
//      non-finite scores give NaN, see flash_fwd_kernel.h);
//   O: lane owns columns lane + 32 i (i < 8); p_j is broadcast by shuffle and
//      O[r][i] += p_j V[j][lane + 32 i] for the keys j row r sees (a ballot of
//      the visibility skips the others: 0 * Inf in a hidden v would be NaN).
// KV cache: K/V rows may come through a block table (paged_kv.h), and with
// num_splits > 1 a block walks a share of the key tiles and writes partial O and
// lse for the combine kernel (split_kv.h), as in the 16-bit kernel.
// Loads are plain element-wise loads (any strides, no alignment needed), with the
// same tile skipping as the 16-bit kernel: tiles past the last visible key of the
// block are never loaded, warps skip tiles their rows cannot see.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/common/smem_opt_in.h"
#include "cuda/flash/flash_api.h"
#include "cuda/flash/block_info.h"
#include "cuda/flash/paged_kv.h"
#include "cuda/flash/split_kv.h"
#include "cuda/flash/variants.h"

namespace tfkernels {
namespace flash {

namespace {

constexpr int kF32Warps = 4;
constexpr int kF32Threads = kF32Warps * 32;
constexpr int kF32RowsPerWarp = 4;
constexpr int kF32BlockM = kF32Warps * kF32RowsPerWarp;  // 16
constexpr int kF32BlockN = 32;                           // one key per lane
constexpr int kF32ColsPerLane = kMaxHeadDim / 32;        // 8
static_assert(kF32BlockM == kFwdFp32BlockM && kF32BlockN == kFwdFp32BlockN, "flash_api.h states the tile");

__host__ __device__ inline int f32_k_stride(int d) { return d | 1; }  // odd: conflict-free column reads

__host__ __device__ inline int f32_smem_floats(int d) {
  return kF32BlockM * d + kF32BlockN * f32_k_stride(d) + kF32BlockN * d;
}

__global__ void __launch_bounds__(kF32Threads) flash_fwd_fp32_kernel(const __grid_constant__ FwdParams params) {
  constexpr float kNegInf = -__builtin_huge_valf();
  extern __shared__ __align__(16) float smem_f32[];
  const int d = params.head_dim;
  const int ks = f32_k_stride(d);
  float* sQ = smem_f32;                   // [16][d]
  float* sK = sQ + kF32BlockM * d;        // [32][ks]
  float* sV = sK + kF32BlockN * ks;       // [32][d]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const GridTile grid_tile = GridTile::of_block(params);  // query tile (causal: bottom first) and KV split
  const int m_block = grid_tile.m_block;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int kv_head = head / params.head_group;
  const int m0 = m_block * kF32BlockM;
  const BlockInfo info(params, batch);
  const int seqlen_q = info.seqlen_q;
  if (m0 >= seqlen_q) return;  // packed batches: past this sequence's end (block-uniform)
  const Mask& mask = info.mask;
  const int len_k = info.len_k();
  const int row_end = (m0 + kF32BlockM < seqlen_q) ? m0 + kF32BlockM : seqlen_q;
  const TileRange tiles = split_share(info.key_tiles(m0, row_end, kF32BlockN), grid_tile.split, split_count(params));
  const int n_tiles = tiles.count();
  const int r0 = m0 + warp * kF32RowsPerWarp;  // this warp's first row
  const bool warp_active = r0 < seqlen_q;

  const float* q_ptr = static_cast<const float*>(params.q) + info.q_offset(params.q_batch_stride, params.q_row_stride) +
                       head * params.q_head_stride;
  const KvRows<float> k_rows =
      KvRows<float>::make(params, params.k, info.k_offset(params.k_batch_stride, params.k_row_stride),
                          params.k_batch_stride, params.k_head_stride, params.k_row_stride, batch, kv_head);
  const KvRows<float> v_rows =
      KvRows<float>::make(params, params.v, info.k_offset(params.v_batch_stride, params.v_row_stride),
                          params.v_batch_stride, params.v_head_stride, params.v_row_stride, batch, kv_head);

  float acc_o[kF32RowsPerWarp][kF32ColsPerLane];
  float row_max[kF32RowsPerWarp];
  float row_sum[kF32RowsPerWarp];
#pragma unroll
  for (int r = 0; r < kF32RowsPerWarp; ++r) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < kF32ColsPerLane; ++i) acc_o[r][i] = 0.0f;
  }

  if (n_tiles > 0) {
    for (int r = warp; r < kF32BlockM; r += kF32Warps) {
      const int row = m0 + r;
      for (int c = lane; c < d; c += 32) {
        sQ[r * d + c] = row < seqlen_q ? q_ptr[static_cast<int64_t>(row) * params.q_row_stride + c] : 0.0f;
      }
    }
  }

  const ScoreMap score_map = ScoreMap::base2(params);
  const Dropout dropout = Dropout::make(params);
  const uint32_t batch_head = static_cast<uint32_t>(batch) * params.heads + head;
  for (int it = 0; it < n_tiles; ++it) {
    const int n0 = (tiles.begin + it) * kF32BlockN;
    __syncthreads();  // every warp is done with the previous tile
    for (int r = warp; r < kF32BlockN; r += kF32Warps) {
      const int key = n0 + r;
      const bool ok = key < len_k;
      const float* krow = ok ? k_rows.row(key) : nullptr;
      const float* vrow = ok ? v_rows.row(key) : nullptr;
      for (int c = lane; c < d; c += 32) {
        sK[r * ks + c] = ok ? krow[c] : 0.0f;
        sV[r * d + c] = ok ? vrow[c] : 0.0f;
      }
    }
    __syncthreads();
    if (!warp_active || !mask.any_visible(r0, r0 + kF32RowsPerWarp, n0, n0 + kF32BlockN)) continue;

    // S for key n0 + lane and the warp's 4 rows.
    float s[kF32RowsPerWarp] = {};
    const float* krow = sK + lane * ks;
    const float* qrow = sQ + warp * kF32RowsPerWarp * d;
    for (int c = 0; c < d; ++c) {
      const float kv = krow[c];
#pragma unroll
      for (int r = 0; r < kF32RowsPerWarp; ++r) s[r] = fmaf(qrow[r * d + c], kv, s[r]);
    }

    const int key = n0 + lane;
    uint32_t kept = ~0u;  // bit r: dropout keeps (row r0 + r, key); Philox in a rolled loop
    if (dropout.on) {
      kept = 0;
#pragma unroll 1
      for (int r = 0; r < kF32RowsPerWarp; ++r) {
        kept |= static_cast<uint32_t>(dropout.keep(batch_head, r0 + r, key)) << r;
      }
    }
    float p[kF32RowsPerWarp];
    uint32_t seen[kF32RowsPerWarp];  // bit j: row r sees key n0 + j
#pragma unroll
    for (int r = 0; r < kF32RowsPerWarp; ++r) {
      const int row = r0 + r;
      const bool visible = mask.visible(row, key);
      seen[r] = __ballot_sync(0xffffffffu, visible);
      const float x = visible ? score_map(s[r]) : kNegInf;
      const float mx = fmaxf(row_max[r], cuda::group_max<32>(x));
      const float m_use = (mx == kNegInf) ? 0.0f : mx;
      const float alpha = cuda::exp2_approx(row_max[r] - m_use);
      p[r] = cuda::exp2_approx(x - m_use);
      row_sum[r] = row_sum[r] * alpha + cuda::group_sum<32>(p[r]);  // pre-dropout, as lse
      row_max[r] = mx;
      if (!((kept >> r) & 1u)) p[r] = 0.0f;
#pragma unroll
      for (int i = 0; i < kF32ColsPerLane; ++i) acc_o[r][i] *= alpha;
    }

    const int keys_here = (len_k - n0) < kF32BlockN ? (len_k - n0) : kF32BlockN;
    for (int j = 0; j < keys_here; ++j) {
      float pj[kF32RowsPerWarp];
#pragma unroll
      for (int r = 0; r < kF32RowsPerWarp; ++r) pj[r] = __shfl_sync(0xffffffffu, p[r], j);
      const float* vrow = sV + j * d;
#pragma unroll
      for (int i = 0; i < kF32ColsPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < d) {
          const float vv = vrow[c];
#pragma unroll
          for (int r = 0; r < kF32RowsPerWarp; ++r) {
            if ((seen[r] >> j) & 1u) acc_o[r][i] = fmaf(pj[r], vv, acc_o[r][i]);
          }
        }
      }
    }
  }

  if (!warp_active) return;
  if (split_count(params) > 1) {  // split-KV (split_kv.h): partial O and base-2 lse to the fp32 scratch
#pragma unroll
    for (int r = 0; r < kF32RowsPerWarp; ++r) {
      const int row = r0 + r;
      if (row >= seqlen_q) break;
      const PartialFinish<true> fin(row_max[r], row_sum[r]);
      const int64_t index = partial_index(params, grid_tile.split, batch, head, row);
#pragma unroll
      for (int i = 0; i < kF32ColsPerLane; ++i) {
        const int c = lane + 32 * i;
        if (c < d) params.o_accum[index * d + c] = acc_o[r][i] * fin.inv_l;
      }
      if (lane == 0) params.lse_accum[index] = fin.lse2;
    }
    return;
  }
  const float sink = sink_logit(params, head);
  float* o_ptr = static_cast<float*>(params.out) + info.q_offset(params.o_batch_stride, params.o_row_stride) +
                 head * params.o_head_stride;
  float* lse_ptr = params.lse + info.stats_offset(params, head);
#pragma unroll
  for (int r = 0; r < kF32RowsPerWarp; ++r) {
    const int row = r0 + r;
    if (row >= seqlen_q) break;
    // Exact division: the fp32 path is checked tightly against float64. l is NaN
    // or 0 after non-finite scores: O = acc * (1 / l) and lse are NaN then.
    const RowFinish<true> fin(row_max[r], row_sum[r], mask.row_sees_a_key(row), sink);
    const float inv_l = fin.inv_l * dropout.scale;
#pragma unroll
    for (int i = 0; i < kF32ColsPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) o_ptr[static_cast<int64_t>(row) * params.o_row_stride + c] = acc_o[r][i] * inv_l;
    }
    if (lane == 0) {
      lse_ptr[row] = fin.lse;
    }
  }
}

}  // namespace

cudaError_t run_flash_fwd_fp32(const FwdParams& params, cudaStream_t stream) {
  const int smem = f32_smem_floats(params.head_dim) * static_cast<int>(sizeof(float));
  if (smem > 48 * 1024) {
    static cuda::DynamicSmemOptIn opt_in;
    const cudaError_t err = opt_in.apply(flash_fwd_fp32_kernel, f32_smem_floats(kMaxHeadDim) * sizeof(float));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((params.seqlen_q + kF32BlockM - 1) / kF32BlockM * (params.num_splits > 1 ? params.num_splits : 1),
                  params.heads, params.batch);
  flash_fwd_fp32_kernel<<<grid, kF32Threads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace tfkernels
