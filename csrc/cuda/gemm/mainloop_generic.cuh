// The generic main loop of the GEMM core, exact in fp32: fp32 inputs (SIMT FMA, or
// TF32 mma m16n8k8 when allowed) and 16-bit inputs whose strides or pointers break
// the 16-byte alignment the tensor-core path needs (e.g. K % 8 != 0): scalar loads,
// any stride, any segment boundary, every edge predicated. CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/convert.h"
#include "cuda/common/ptx.h"
#include "cuda/gemm/gemm_traits.h"
#include "cuda/gemm/tile_scheduler.h"

namespace tfkernels {
namespace gemm {

using cuda::mma_1688_tf32;
using cuda::to_float;
using cuda::to_tf32;

// 64x64x16 tiles, 256 threads, operands converted to fp32 in smem as [k][m] and
// [k][n] (padded rows: the TF32 fragment reads hit distinct banks), register
// prefetch of the next slice while the current one is multiplied. kTf32: 8 warps
// of 32x16 mma m16n8k8 tiles (operands rounded to TF32, fp32 accumulation); else
// each thread owns a 4x4 of FMAs at rows ty + 16i, columns tx + 16j.
struct GenericTile {
  static constexpr int BM = 64, BN = 64, BK = 16, kThreads = 256;
};

template <class Traits, bool kTf32>
__global__ void __launch_bounds__(GenericTile::kThreads)
    gemm_generic_kernel(const __grid_constant__ typename Traits::Params p,
                        const __grid_constant__ typename Traits::Epilogue ep) {
  constexpr Layout LA = Traits::kLayoutA, LB = Traits::kLayoutB;
  constexpr bool kRowSum = Traits::kRowSum;
  constexpr int BM = GenericTile::BM, BN = GenericTile::BN, BK = GenericTile::BK, THREADS = GenericTile::kThreads;
  constexpr int PA = BM + 8, PB = BN + 8;
  constexpr int LOADS_A = BM * BK / THREADS, LOADS_B = BN * BK / THREADS;
  __shared__ __align__(16) float sA[BK][PA];
  __shared__ __align__(16) float sB[BK][PB];

  int tile_m, tile_n;
  tile_coords(p.tiles_m, p.tiles_n, tile_m, tile_n);
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const int tid = threadIdx.x;
  const int M = p.M, N = p.N, K = p.K;

  // Element e of the slice: walk the operand's contiguous dimension fastest.
  auto a_coord = [&](int e, int& mm, int& kk) {
    if constexpr (LA == Layout::kInnerK) { kk = e % BK; mm = e / BK; } else { mm = e % BM; kk = e / BM; }
  };
  auto b_coord = [&](int e, int& nn, int& kk) {
    if constexpr (LB == Layout::kInnerK) { kk = e % BK; nn = e / BK; } else { nn = e % BN; kk = e / BN; }
  };

  float ra[LOADS_A], rb[LOADS_B];
  auto fetch = [&](int kt) {
    const int k0 = kt * BK;
#pragma unroll
    for (int it = 0; it < LOADS_A; ++it) {
      int mm, kk;
      a_coord(tid + it * THREADS, mm, kk);
      const int m = m0 + mm, k = k0 + kk;
      ra[it] = 0.f;
      if (m < M && k < K) ra[it] = to_float(*(LA == Layout::kInnerK ? p.a.at(m, k) : p.a.at(k, m)));
    }
#pragma unroll
    for (int it = 0; it < LOADS_B; ++it) {
      int nn, kk;
      b_coord(tid + it * THREADS, nn, kk);
      const int n = n0 + nn, k = k0 + kk;
      rb[it] = 0.f;
      if (n < N && k < K) rb[it] = to_float(*(LB == Layout::kInnerK ? p.b.at(n, k) : p.b.at(k, n)));
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int it = 0; it < LOADS_A; ++it) {
      int mm, kk;
      a_coord(tid + it * THREADS, mm, kk);
      sA[kk][mm] = ra[it];
    }
#pragma unroll
    for (int it = 0; it < LOADS_B; ++it) {
      int nn, kk;
      b_coord(tid + it * THREADS, nn, kk);
      sB[kk][nn] = rb[it];
    }
  };

  float acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  const bool do_rowsum = kRowSum && tile_n == 0 && tid < BM;
  float rsum = 0.f;

  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int wm = warp / 4, wn = warp % 4;      // TF32: 2 x 4 warps of 32 x 16
  const int ty = tid / 16, tx = tid % 16;      // SIMT: 16 x 16 threads of 4 x 4

  const int KT = (K + BK - 1) / BK;
  if (KT > 0) fetch(0);
  for (int kt = 0; kt < KT; ++kt) {
    stash();
    __syncthreads();
    if (kt + 1 < KT) fetch(kt + 1);
    if constexpr (kTf32) {
#pragma unroll
      for (int ks = 0; ks < BK; ks += 8) {
        uint32_t af[2][4], bf[2][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = wm * 32 + mi * 16 + g;
          af[mi][0] = to_tf32(sA[ks + q][r]);
          af[mi][1] = to_tf32(sA[ks + q][r + 8]);
          af[mi][2] = to_tf32(sA[ks + q + 4][r]);
          af[mi][3] = to_tf32(sA[ks + q + 4][r + 8]);
        }
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
          const int c = wn * 16 + ni * 8 + g;
          bf[ni][0] = to_tf32(sB[ks + q][c]);
          bf[ni][1] = to_tf32(sB[ks + q + 4][c]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 2; ++ni)
            mma_1688_tf32(*reinterpret_cast<float(*)[4]>(&acc[(mi * 2 + ni) * 4]), af[mi], bf[ni]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sA[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = sB[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i * 4 + j] = fmaf(a[i], b[j], acc[i * 4 + j]);
      }
    }
    if (do_rowsum) {
#pragma unroll
      for (int k = 0; k < BK; ++k) rsum += sA[k][tid];
    }
    __syncthreads();
  }

  if constexpr (kTf32) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 2; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + wm * 32 + mi * 16 + g + (e >= 2 ? 8 : 0);
          const int col = n0 + wn * 16 + ni * 8 + 2 * q + (e & 1);
          if (row < M && col < N) ep.store1(row, col, acc[(mi * 2 + ni) * 4 + e]);
        }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = m0 + ty + 16 * i, col = n0 + tx + 16 * j;
        if (row < M && col < N) ep.store1(row, col, acc[i * 4 + j]);
      }
  }
  if (do_rowsum && m0 + tid < M) ep.store_rowsum(m0 + tid, rsum);
}

}  // namespace gemm
}  // namespace tfkernels
