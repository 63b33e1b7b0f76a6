// Tile configurations of the tensor-core GEMM and the heuristic that picks one per
// problem. Plain C++ (host) plus constexpr traits the kernels read.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/common/grid.h"

namespace tfkernels {
namespace gemm {

// A CTA computes a BM x BN tile of C with WARPS_M x WARPS_N warps, each owning a
// (BM/WARPS_M) x (BN/WARPS_N) warp tile of m16n8k16 mma fragments, while a
// STAGES-deep cp.async pipeline streams BK-wide slices of A and B through shared
// memory. BK = 64 16-bit elements makes every K-contiguous smem row 128 bytes, and
// BM, BN are multiples of 64, so every smem row (K- or M/N-contiguous) is a whole
// number of 128-byte lines and one XOR swizzle (chunk ^ row % 8) serves all layouts.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int kMinBlocks = MIN_BLOCKS_;  // __launch_bounds__ occupancy target
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MFRAG = WM / 16, NFRAG = WN / 8;
  static constexpr int kElemBytes = 2;
  static constexpr size_t kStageBytes = size_t(BM + BN) * BK * kElemBytes;
  static constexpr size_t kPipeBytes = kStageBytes * STAGES;
  // The epilogue stages the fp32 C tile with rows padded by 8 floats (see the kernel).
  static constexpr int kEpiPitch = BN + 8;
  static constexpr size_t kEpiBytes = size_t(BM) * kEpiPitch * 4;
  static constexpr size_t kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;

  static_assert(BK == 64, "smem rows of K-contiguous tiles must be 128 bytes (8 chunks) for the swizzle");
  static_assert(BM % 64 == 0 && BN % 64 == 0, "M/N-contiguous smem rows must be whole 128-byte lines");
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: whole m16 fragments and pairs of n8 fragments");
  static_assert((BM * BK / 8) % kThreads == 0 && (BN * BK / 8) % kThreads == 0, "even cp.async split");
};

// The shapes (smem: pipeline / epilogue staging; the max is allocated):
//  L  128x256x64, 8 warps (2x4, warp tile 64x64), 3 stages: 144 KiB, 1 CTA/SM.
//     Highest operand reuse: per k step a CTA loads (128 + 256) elements for
//     128 * 256 MACs, 1/85 element per MAC against 1/64 for 128x128.
//  M  128x128x64, 8 warps (2x4, warp tile 64x32), 3 stages: 96 KiB, 2 CTAs/SM on
//     H100 (228 KiB; registers capped at 128 for it), 1 on A100 (164 KiB). GEMMs
//     with a segmented (head-layout) or M/N-contiguous operand, or a row sum (the
//     backward GEMMs), run it at 1 CTA/SM (see min_blocks in mainloop_tc.cuh).
//  S   64x128x64, 4 warps (2x2, warp tile 32x64), 4 stages: 96 KiB, 2 CTAs/SM:
//     for few tokens (M <= 64 wastes no half tile) or too few 128x128 tiles to fill the GPU.
using TileL = TileConfig<128, 256, 64, 2, 4, 3, 1>;
using TileM = TileConfig<128, 128, 64, 2, 4, 3, 2>;
using TileS = TileConfig<64, 128, 64, 2, 2, 4, 2>;

enum class TileShape { k128x256, k128x128, k64x128 };

// The heuristic. A GEMM runs fastest with the largest tile that still fills the
// machine: bigger tiles read less of A and B per MAC (see above), but the block
// scheduler places one CTA per SM before it doubles up, so a grid of fewer tiles
// than SMs leaves SMs idle, and that loss (up to 2x) outweighs the reuse gain
// (~1.3x between neighbouring shapes). So:
//  - M <= 64 (decode, tiny batches): S. A 128-row tile would be at least half empty.
//  - L if it gives at least one full wave (tiles >= SMs).
//  - M if it gives at least one full wave.
//  - S otherwise: twice the CTAs of M, 2 per SM, for small problems.
// `allow_large` is false for GEMMs compiled without the L shape (the backward).
// The GPU benchmarks (bench/) are meant to justify or move these thresholds; wave
// quantisation (e.g. 1.1 waves of M vs 2.2 of S) is not modelled yet.
inline TileShape pick_tile_shape(int64_t M, int64_t N, int num_sms, bool allow_large) {
  if (M <= 64) return TileShape::k64x128;
  using cuda::ceil_div;
  const int64_t tiles_l = ceil_div<int64_t>(M, 128) * ceil_div<int64_t>(N, 256);
  const int64_t tiles_m = ceil_div<int64_t>(M, 128) * ceil_div<int64_t>(N, 128);
  if (allow_large && tiles_l >= num_sms) return TileShape::k128x256;
  if (tiles_m >= num_sms) return TileShape::k128x128;
  return TileShape::k64x128;
}

}  // namespace gemm
}  // namespace tfkernels
