// The tensor-core main loop of the GEMM core (fp16/bf16, sm_80+): cp.async 16-byte
// chunks into an XOR-swizzled STAGES-deep smem ring, ldmatrix(.trans) fragments,
// mma.sync m16n8k16 with fp32 accumulation, then the fp32 C tile staged through
// smem so the epilogue functor sees 8 consecutive columns per thread. Every edge is
// predicated: out-of-range chunks are zero-filled, never read, and the epilogue
// skips rows >= M and columns >= N. CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/gemm/gemm_traits.h"
#include "cuda/gemm/tile_scheduler.h"
#include "cuda/gemm/tile_size.h"

namespace tfkernels {
namespace gemm {

using cuda::cp_async_16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;
using cuda::ldmatrix_x4;
using cuda::ldmatrix_x4_trans;
using cuda::mma_16816;
using cuda::pack2;
using cuda::swizzle_chunk;

// Global -> smem for one BK slice of one operand, kMN rows (of A: BM, of B: BN)
// wide. The smem tile follows the operand's contiguous dimension: [kMN][BK] for a
// K-contiguous operand, [BK][kMN] for an M/N-contiguous one. Either way a smem row
// is a run of the operand's inner index, so every 16-byte chunk is contiguous in
// global memory; chunk c of smem row r lands at chunk c ^ (r % 8). Chunks outside
// [0, MN) x [0, K) are zero-filled: the K tail contributes 0 * 0, and rows past M
// or N are never stored.
template <Layout L, int kMN, int BK, int kThreads, class View, typename T>
__device__ __forceinline__ void load_slice(T* dst, const View& src, int mn0, int MN, int k0, int K, int tid) {
  constexpr bool kInnerK = L == Layout::kInnerK;
  constexpr int kRowElems = kInnerK ? BK : kMN;   // smem row: the operand's inner index
  constexpr int kRows = kInnerK ? kMN : BK;
  constexpr int kChunksPerRow = kRowElems / 8;
  static_assert((kRows * kChunksPerRow) % kThreads == 0, "even cp.async split");
  const int outer0 = kInnerK ? mn0 : k0, outer_end = kInnerK ? MN : K;
  const int inner0 = kInnerK ? k0 : mn0, inner_end = kInnerK ? K : MN;
#pragma unroll
  for (int it = 0; it < kRows * kChunksPerRow / kThreads; ++it) {
    const int c = tid + it * kThreads, r = c / kChunksPerRow, ch = c % kChunksPerRow;
    const int outer = outer0 + r, inner = inner0 + ch * 8;
    const bool ok = outer < outer_end && inner < inner_end;
    cp_async_16(dst + r * kRowElems + swizzle_chunk(r, ch) * 8, ok ? src.at(outer, inner) : src.base(), ok);
  }
}

// kRowSum: the CTAs of tile column 0 also accumulate sum_k A[m, k] for their rows
// (one extra mma per A fragment against a B fragment of ones, exact fp32
// accumulation of the same 16-bit values the GEMM uses) and hand it to
// Epi::store_rowsum. The QKV backward gets db = column sums of dQKV this way,
// inside the dW GEMM that already streams dQKV^T as its A operand.
// Occupancy: Tile::kMinBlocks CTAs per SM (TileM: 2, which caps registers at 128) for
// plain K-contiguous operands (the forward GEMMs). A segmented operand, an M/N-
// contiguous one (ldmatrix.trans addressing) or the row-sum accumulators do not fit in
// 128 registers without spilling (measured with -Xptxas=-v, nvcc 13.0: TileM with
// A kInnerK / B kInnerMN spills 4-16 bytes, with both kInnerMN and kRowSum 84-164
// bytes): those run at 1 CTA per SM.
template <class Traits, class Tile>
constexpr int min_blocks() {
  return (Traits::kSegA || Traits::kSegB || Traits::kTransposed || Traits::kRowSum) ? 1 : Tile::kMinBlocks;
}

template <class Traits, class Tile>
__global__ void __launch_bounds__(Tile::kThreads, min_blocks<Traits, Tile>())
    gemm_tc_kernel(const __grid_constant__ typename Traits::Params p,
                   const __grid_constant__ typename Traits::Epilogue ep) {
  using T = typename Traits::Element;
  constexpr Layout LA = Traits::kLayoutA, LB = Traits::kLayoutB;
  constexpr bool kRowSum = Traits::kRowSum;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, STAGES = Tile::STAGES;
  constexpr int THREADS = Tile::kThreads, WM = Tile::WM, WN = Tile::WN;
  constexpr int MFRAG = Tile::MFRAG, NFRAG = Tile::NFRAG, WARPS_N = Tile::WARPS_N;
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 or bf16");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + STAGES * BM * BK;

  int tile_m, tile_n;
  tile_coords(p.tiles_m, p.tiles_n, tile_m, tile_n);
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int M = p.M, N = p.N, K = p.K;

  // Global -> smem for one BK slice of A and of B (the chunk layout: load_slice).
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    load_slice<LA, BM, BK, THREADS>(sA + stage * BM * BK, p.a, m0, M, k0, K, tid);
    load_slice<LB, BN, BK, THREADS>(sB + stage * BN * BK, p.b, n0, N, k0, K, tid);
  };

  float acc[MFRAG][NFRAG][4];
#pragma unroll
  for (int i = 0; i < MFRAG; ++i)
#pragma unroll
    for (int j = 0; j < NFRAG; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  float rsum[kRowSum ? MFRAG : 1][4];
#pragma unroll
  for (int i = 0; i < (kRowSum ? MFRAG : 1); ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) rsum[i][e] = 0.f;
  const bool do_rowsum = kRowSum && tile_n == 0 && warp_n == 0;  // warp-uniform
  const uint32_t one2 = pack2<T>(1.f, 1.f);
  const uint32_t ones[2] = {one2, one2};

  // Fragments of one BK slice from smem, then the mma. Fragment layouts: ptx.h.
  auto compute_stage = [&](int stage) {
    const T* cA = sA + stage * BM * BK;
    const T* cB = sB + stage * BN * BK;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[MFRAG][4];
      uint32_t bf[NFRAG][2];
#pragma unroll
      for (int mi = 0; mi < MFRAG; ++mi) {
        if constexpr (LA == Layout::kInnerK) {
          // matrices: rows 0-7 | 8-15 of k chunk 0, then of k chunk 1 -> a0 a1 a2 a3
          const int row = warp_m * WM + mi * 16 + (lane & 15);
          const int kc = kk * 2 + (lane >> 4);
          ldmatrix_x4(af[mi], cA + row * BK + swizzle_chunk(row, kc) * 8);
        } else {
          // smem rows are k: transposed loads; lanes 0-7 k 0-7 / m 0-7, 8-15 k 0-7 /
          // m 8-15, 16-23 k 8-15 / m 0-7, 24-31 k 8-15 / m 8-15 -> a0 a1 a2 a3
          const int k = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int mc = (warp_m * WM + mi * 16) / 8 + ((lane >> 3) & 1);
          ldmatrix_x4_trans(af[mi], cA + k * BM + swizzle_chunk(k, mc) * 8);
        }
      }
#pragma unroll
      for (int nj = 0; nj < NFRAG / 2; ++nj) {
        uint32_t r[4];
        if constexpr (LB == Layout::kInnerK) {
          // lanes 0-7 n 0-7 / k chunk 0, 8-15 n 0-7 / chunk 1, 16-23 n 8-15 / chunk 0,
          // 24-31 n 8-15 / chunk 1 -> (b0, b1) of fragment 2nj, then of 2nj+1
          const int n = warp_n * WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int kc = kk * 2 + ((lane >> 3) & 1);
          ldmatrix_x4(r, cB + n * BK + swizzle_chunk(n, kc) * 8);
        } else {
          const int k = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int nc = (warp_n * WN + nj * 16) / 8 + (lane >> 4);
          ldmatrix_x4_trans(r, cB + k * BN + swizzle_chunk(k, nc) * 8);
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MFRAG; ++mi)
#pragma unroll
        for (int ni = 0; ni < NFRAG; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
      if constexpr (kRowSum) {
        if (do_rowsum) {
#pragma unroll
          for (int mi = 0; mi < MFRAG; ++mi) mma_16816<T>(rsum[mi], af[mi], ones);
        }
      }
    }
  };

  // The pipeline: STAGES-1 slices in flight ahead of the one being multiplied.
  // Commit group g carries slice g (possibly empty past the end), so after
  // wait<STAGES-2> at iteration kt slice kt has landed; the __syncthreads also
  // proves every warp finished slice kt-1, whose stage the prefetch now overwrites.
  const int KT = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < KT) load_stage(next % STAGES, next);
    cp_async_commit();
    compute_stage(kt % STAGES);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline smem is now free for the C tile

  // Epilogue: stage C (fp32) in smem, rows padded to BN + 8 floats so the float2
  // fragment writes (8 rows x 4 column pairs per half-warp phase) hit 32 distinct banks.
  constexpr int PITCH = Tile::kEpiPitch;
  float* sC = reinterpret_cast<float*>(smem_raw);
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MFRAG; ++mi)
#pragma unroll
    for (int ni = 0; ni < NFRAG; ++ni) {
      const int r = warp_m * WM + mi * 16 + g;
      const int c = warp_n * WN + ni * 8 + 2 * q;
      *reinterpret_cast<float2*>(sC + r * PITCH + c) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(sC + (r + 8) * PITCH + c) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
  __syncthreads();

  // Each thread takes 8 consecutive columns of a row: consecutive threads cover a
  // row left to right, so the functor's 16-byte stores coalesce. The two float4
  // reads go in swapped order for threads 4-7 of each quarter warp, which makes the
  // 8 threads of one 128-bit access phase touch 32 distinct banks.
  constexpr int VPR = BN / 8;
  for (int idx = tid; idx < BM * VPR; idx += THREADS) {
    const int r = idx / VPR, cv = idx % VPR;
    const int row = m0 + r, col0 = n0 + cv * 8;
    if (row >= M || col0 >= N) continue;
    const float* src = sC + r * PITCH + cv * 8;
    const bool swap = (cv >> 2) & 1;
    const float4 first = *reinterpret_cast<const float4*>(src + (swap ? 4 : 0));
    const float4 second = *reinterpret_cast<const float4*>(src + (swap ? 0 : 4));
    const float4 lo = swap ? second : first;
    const float4 hi = swap ? first : second;
    float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    if (col0 + 8 <= N) {
      ep.store8(row, col0, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (col0 + i < N) ep.store1(row, col0 + i, v[i]);
    }
  }

  if constexpr (kRowSum) {
    // All 8 columns of the ones-product hold the row sum; lane 4g holds rows g, g+8.
    if (do_rowsum && q == 0) {
#pragma unroll
      for (int mi = 0; mi < MFRAG; ++mi) {
        const int row = m0 + warp_m * WM + mi * 16 + g;
        if (row < M) ep.store_rowsum(row, rsum[mi][0]);
        if (row + 8 < M) ep.store_rowsum(row + 8, rsum[mi][2]);
      }
    }
  }
}

}  // namespace gemm
}  // namespace tfkernels
