// The GEMM core: C = A B^T, fp32 accumulation, any M, N, K, operands read through
// strides (gemm_args.h), results handed to an epilogue functor (epilogue.h).
// CUDA headers only; included by the instantiation .cu files.
//
// Two kernels:
//  gemm_tc_kernel       fp16/bf16 tensor cores (sm_80+). cp.async 16-byte chunks
//                       into an XOR-swizzled STAGES-deep smem ring, ldmatrix(.trans)
//                       fragments, mma.sync m16n8k16, fp32 C tile staged through
//                       smem so the epilogue sees 8 consecutive columns per thread.
//  gemm_generic_kernel  everything else, exact in fp32: fp32 inputs (SIMT FMA, or
//                       TF32 mma m16n8k8 when allowed) and 16-bit inputs whose
//                       strides or pointers break the 16-byte alignment the
//                       tensor-core path needs (e.g. K % 8 != 0): scalar loads, any
//                       stride, any segment boundary.
// Both rasterise the grid in groups of kGroupM tile rows (see tile_coords) and
// predicate every edge: out-of-range chunks are zero-filled, never read, and the
// epilogue skips rows >= M and columns >= N.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/gemm/epilogue.h"
#include "cuda/gemm/gemm_args.h"
#include "cuda/gemm/gemm_traits.h"

namespace tfkernels {
namespace cuda {
namespace gemm {

// ------------------------------------------------------------------ operands on the device

// Device form of Operand (gemm_args.h): parts unrolled into scalars (no dynamically
// indexed parameter arrays, which would go through local memory) and the two
// divisors of the segmented form as FastDiv.
template <typename T, bool kSeg>
struct OperandView {
  const T* p0 = nullptr;
  const T* p1 = nullptr;
  const T* p2 = nullptr;
  int64_t ld0 = 0, ld1 = 0, ld2 = 0;
  int64_t ss0 = 0, ss1 = 0, ss2 = 0;  // segment (head) strides
  int64_t bs0 = 0, bs1 = 0, bs2 = 0;  // outer segment (batch) strides
  int pb1 = INT_MAX, pb2 = INT_MAX;   // where parts 1 and 2 begin along j
  int seg_len = 1, outer_len = 1;
  FastDiv div_seg, div_outer;

  // &X[i][j]; i the outer index, j the inner (contiguous) one. i, j >= 0.
  __device__ __forceinline__ const T* at(int i, int j) const {
    if constexpr (!kSeg) {
      return p0 + static_cast<int64_t>(i) * ld0 + j;
    } else {
      const T* p = p0;
      int64_t ld = ld0, ss = ss0, bs = bs0;
      if (j >= pb2) {
        p = p2; ld = ld2; ss = ss2; bs = bs2; j -= pb2;
      } else if (j >= pb1) {
        p = p1; ld = ld1; ss = ss1; bs = bs1; j -= pb1;
      }
      const int g = static_cast<int>(div_seg.div(static_cast<uint32_t>(j)));
      const int d = j - g * seg_len;
      const int b = static_cast<int>(div_outer.div(static_cast<uint32_t>(i)));
      const int s = i - b * outer_len;
      return p + g * ss + b * bs + s * ld + d;
    }
  }
  __device__ __forceinline__ const T* base() const { return p0; }
};

template <typename T, bool kSeg>
OperandView<T, kSeg> make_view(const Operand& o) {
  OperandView<T, kSeg> v;
  v.p0 = static_cast<const T*>(o.ptr[0]);
  v.ld0 = o.ld[0];
  if constexpr (kSeg) {
    v.p1 = static_cast<const T*>(o.ptr[1]);
    v.p2 = static_cast<const T*>(o.ptr[2]);
    v.ld1 = o.ld[1];
    v.ld2 = o.ld[2];
    v.ss0 = o.seg_stride[0]; v.ss1 = o.seg_stride[1]; v.ss2 = o.seg_stride[2];
    v.bs0 = o.batch_stride[0]; v.bs1 = o.batch_stride[1]; v.bs2 = o.batch_stride[2];
    v.pb1 = o.ptr[1] != nullptr ? o.part_begin[1] : INT_MAX;
    v.pb2 = o.ptr[2] != nullptr ? o.part_begin[2] : INT_MAX;
    v.seg_len = o.seg_len;
    v.outer_len = o.outer_len;
    v.div_seg = FastDiv(static_cast<uint32_t>(o.seg_len > 0 ? o.seg_len : 1));
    v.div_outer = FastDiv(static_cast<uint32_t>(o.outer_len > 0 ? o.outer_len : 1));
  }
  return v;
}

template <typename T, bool kSegA, bool kSegB>
struct GemmParams {
  OperandView<T, kSegA> a;
  OperandView<T, kSegB> b;
  int M = 0, N = 0, K = 0;
  int tiles_m = 0, tiles_n = 0;
};

// ------------------------------------------------------------------ rasterisation

// Linear block id -> (tile_m, tile_n), column-major within groups of kGroupM tile
// rows: consecutive CTAs (resident together) sweep kGroupM row panels of A against
// one column panel of B before moving on, so a wave touches ~kGroupM A panels and
// ~SMs/kGroupM B panels instead of 1 A panel and every B panel: far fewer L2 misses
// once a B (weight) panel or an A panel no longer fits in L2.
constexpr int kGroupM = 8;

__device__ __forceinline__ void tile_coords(int tiles_m, int tiles_n, int& tile_m, int& tile_n) {
  const int pid = blockIdx.x;
  const int span = kGroupM * tiles_n;
  const int first_m = (pid / span) * kGroupM;
  const int rows = min(tiles_m - first_m, kGroupM);
  const int local = pid - (pid / span) * span;
  tile_m = first_m + local % rows;
  tile_n = local / rows;
}

// ------------------------------------------------------------------ tensor-core kernel

// kRowSum: the CTAs of tile column 0 also accumulate sum_k A[m, k] for their rows
// (one extra mma per A fragment against a B fragment of ones, exact fp32
// accumulation of the same 16-bit values the GEMM uses) and hand it to
// Epi::store_rowsum. The QKV backward gets db = column sums of dQKV this way,
// inside the dW GEMM that already streams dQKV^T as its A operand.
// Occupancy: Cfg::kMinBlocks CTAs per SM (TileM: 2, which caps registers at 128) for
// plain K-contiguous operands (the forward GEMMs). A segmented operand, an M/N-
// contiguous one (ldmatrix.trans addressing) or the row-sum accumulators do not fit in
// 128 registers without spilling (measured with -Xptxas=-v, nvcc 13.0: TileM with
// A kInnerK / B kInnerMN spills 4-16 bytes, with both kInnerMN and kRowSum 84-164
// bytes): those run at 1 CTA per SM.
template <class Cfg, bool kSegmented, bool kTransposed, bool kRowSum>
constexpr int min_blocks() {
  return (kSegmented || kTransposed || kRowSum) ? 1 : Cfg::kMinBlocks;
}

template <typename T, class Cfg, Layout LA, Layout LB, bool kSegA, bool kSegB, bool kRowSum, class Epi>
__global__ void __launch_bounds__(Cfg::kThreads, min_blocks<Cfg, kSegA || kSegB,
                                                            LA == Layout::kInnerMN || LB == Layout::kInnerMN,
                                                            kRowSum>())
    gemm_tc_kernel(const __grid_constant__ GemmParams<T, kSegA, kSegB> p, const __grid_constant__ Epi ep) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int THREADS = Cfg::kThreads, WM = Cfg::WM, WN = Cfg::WN;
  constexpr int MFRAG = Cfg::MFRAG, NFRAG = Cfg::NFRAG, WARPS_N = Cfg::WARPS_N;
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

  // Global -> smem for one BK slice. Tile rows are the operand's outer index, so
  // every 16-byte chunk is contiguous in global memory; chunk c of row r lands at
  // chunk c ^ (r % 8). Chunks outside [0, M) x [0, K) (or N) are zero-filled: the K
  // tail contributes 0 * 0, and rows past M or N are never stored.
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    T* dA = sA + stage * BM * BK;
    T* dB = sB + stage * BN * BK;
    if constexpr (LA == Layout::kInnerK) {  // smem [BM][BK]
      constexpr int CPR = BK / 8;
#pragma unroll
      for (int it = 0; it < BM * CPR / THREADS; ++it) {
        const int c = tid + it * THREADS, r = c / CPR, ch = c % CPR;
        const int m = m0 + r, k = k0 + ch * 8;
        const bool ok = m < M && k < K;
        cp_async_16(dA + r * BK + swizzle_chunk(r, ch) * 8, ok ? p.a.at(m, k) : p.a.base(), ok);
      }
    } else {  // smem [BK][BM]
      constexpr int CPR = BM / 8;
#pragma unroll
      for (int it = 0; it < BK * CPR / THREADS; ++it) {
        const int c = tid + it * THREADS, r = c / CPR, ch = c % CPR;
        const int m = m0 + ch * 8, k = k0 + r;
        const bool ok = m < M && k < K;
        cp_async_16(dA + r * BM + swizzle_chunk(r, ch) * 8, ok ? p.a.at(k, m) : p.a.base(), ok);
      }
    }
    if constexpr (LB == Layout::kInnerK) {  // smem [BN][BK]
      constexpr int CPR = BK / 8;
#pragma unroll
      for (int it = 0; it < BN * CPR / THREADS; ++it) {
        const int c = tid + it * THREADS, r = c / CPR, ch = c % CPR;
        const int n = n0 + r, k = k0 + ch * 8;
        const bool ok = n < N && k < K;
        cp_async_16(dB + r * BK + swizzle_chunk(r, ch) * 8, ok ? p.b.at(n, k) : p.b.base(), ok);
      }
    } else {  // smem [BK][BN]
      constexpr int CPR = BN / 8;
#pragma unroll
      for (int it = 0; it < BK * CPR / THREADS; ++it) {
        const int c = tid + it * THREADS, r = c / CPR, ch = c % CPR;
        const int n = n0 + ch * 8, k = k0 + r;
        const bool ok = n < N && k < K;
        cp_async_16(dB + r * BN + swizzle_chunk(r, ch) * 8, ok ? p.b.at(k, n) : p.b.base(), ok);
      }
    }
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
  constexpr int PITCH = Cfg::kEpiPitch;
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

// ------------------------------------------------------------------ generic kernel

// 64x64x16 tiles, 256 threads, operands converted to fp32 in smem as [k][m] and
// [k][n] (padded rows: the TF32 fragment reads hit distinct banks), register
// prefetch of the next slice while the current one is multiplied. kTf32: 8 warps
// of 32x16 mma m16n8k8 tiles (operands rounded to TF32, fp32 accumulation); else
// each thread owns a 4x4 of FMAs at rows ty + 16i, columns tx + 16j.
struct GenericTile {
  static constexpr int BM = 64, BN = 64, BK = 16, kThreads = 256;
};

template <typename T, bool kTf32, Layout LA, Layout LB, bool kSegA, bool kSegB, bool kRowSum, class Epi>
__global__ void __launch_bounds__(256)
    gemm_generic_kernel(const __grid_constant__ GemmParams<T, kSegA, kSegB> p, const __grid_constant__ Epi ep) {
  constexpr int BM = GenericTile::BM, BN = GenericTile::BN, BK = GenericTile::BK, THREADS = 256;
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

// ------------------------------------------------------------------ launchers

template <typename T, bool kSegA, bool kSegB>
GemmParams<T, kSegA, kSegB> make_params(const Operand& a, const Operand& b, int M, int N, int K, int BM, int BN) {
  GemmParams<T, kSegA, kSegB> p;
  p.a = make_view<T, kSegA>(a);
  p.b = make_view<T, kSegB>(b);
  p.M = M;
  p.N = N;
  p.K = K;
  p.tiles_m = static_cast<int>(ceil_div(M, BM));
  p.tiles_n = static_cast<int>(ceil_div(N, BN));
  return p;
}

template <typename T, class Cfg, Layout LA, Layout LB, bool kSegA, bool kSegB, bool kRowSum, class Epi>
cudaError_t launch_tc(const Operand& a, const Operand& b, int M, int N, int K, const Epi& ep,
                      cudaStream_t stream) {
  const auto p = make_params<T, kSegA, kSegB>(a, b, M, N, K, Cfg::BM, Cfg::BN);
  const int64_t tiles = static_cast<int64_t>(p.tiles_m) * p.tiles_n;
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = gemm_tc_kernel<T, Cfg, LA, LB, kSegA, kSegB, kRowSum, Epi>;
  // Per device and cheap; not a stream operation, so CUDA-graph capture is unaffected.
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(tiles), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, ep);
  return cudaGetLastError();
}

template <typename T, bool kTf32, Layout LA, Layout LB, bool kSegA, bool kSegB, bool kRowSum, class Epi>
cudaError_t launch_generic(const Operand& a, const Operand& b, int M, int N, int K, const Epi& ep,
                           cudaStream_t stream) {
  const auto p = make_params<T, kSegA, kSegB>(a, b, M, N, K, GenericTile::BM, GenericTile::BN);
  const int64_t tiles = static_cast<int64_t>(p.tiles_m) * p.tiles_n;
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  gemm_generic_kernel<T, kTf32, LA, LB, kSegA, kSegB, kRowSum, Epi>
      <<<static_cast<unsigned>(tiles), GenericTile::kThreads, 0, stream>>>(p, ep);
  return cudaGetLastError();
}

// The heuristic of gemm_traits.h picks the tile unless tile_override (a TileShape,
// from TFKERNELS_GEMM_TILE: tests and benchmarks) forces one; kAllowLarge compiles
// the 128x256 shape (without it, 128x256 falls back to 128x128). A shape whose smem
// exceeds the device's opt-in limit (max_smem; e.g. 99 KiB on sm_86/sm_89, where the
// sm_80 code runs) steps down to the next smaller one, and to the generic kernel if
// none fits.
template <typename T, Layout LA, Layout LB, bool kSegA, bool kSegB, bool kRowSum, bool kAllowLarge, class Epi>
cudaError_t launch_tc_auto(const Operand& a, const Operand& b, int M, int N, int K, const Epi& ep, int num_sms,
                           int tile_override, size_t max_smem, cudaStream_t stream) {
  const size_t limit = max_smem > 0 ? max_smem : SIZE_MAX;  // 0: unknown, no limit
  TileShape shape =
      tile_override >= 0 ? static_cast<TileShape>(tile_override) : pick_tile_shape(M, N, num_sms, kAllowLarge);
  if (shape == TileShape::k128x256 && (!kAllowLarge || TileL::kSmemBytes > limit)) shape = TileShape::k128x128;
  if (shape == TileShape::k128x128 && TileM::kSmemBytes > limit) shape = TileShape::k64x128;
  if (TileS::kSmemBytes > limit)
    return launch_generic<T, false, LA, LB, kSegA, kSegB, kRowSum>(a, b, M, N, K, ep, stream);
  switch (shape) {
    case TileShape::k128x256:
      if constexpr (kAllowLarge) return launch_tc<T, TileL, LA, LB, kSegA, kSegB, kRowSum>(a, b, M, N, K, ep, stream);
      [[fallthrough]];
    case TileShape::k128x128:
      return launch_tc<T, TileM, LA, LB, kSegA, kSegB, kRowSum>(a, b, M, N, K, ep, stream);
    default:
      return launch_tc<T, TileS, LA, LB, kSegA, kSegB, kRowSum>(a, b, M, N, K, ep, stream);
  }
}

}  // namespace gemm
}  // namespace cuda
}  // namespace tfkernels
