// Compile-time tile shapes and shared-memory layout of the tensor-core flash
// attention kernels (fp16/bf16), forward and backward. Both use one tile layout:
// `rows` x kHeadDim elements stored with a padded row stride, loaded by
// load_tile() in flash_tile.h and read by ldmatrix (plain or .trans).
#pragma once

#include "head_dim.h"

namespace tfkernels {
namespace flash {

// kHeadDim: the padded head dim this instantiation handles (a multiple of 32).
// kBlockM: query rows per thread block; each warp owns 16 of them (one m16 mma row
//          tile), so kBlockM = 16 * kNWarps.
// kBlockN: keys per K/V tile (a multiple of 16).
// kQInRegs: keep the warp's Q fragments in registers for the whole kernel
//          (kHeadDim / 4 registers a thread) instead of re-reading them with
//          ldmatrix every tile.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kQInRegs_ = true>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr bool kQInRegs = kQInRegs_;
  // K and V tiles are double-buffered: tile j+1 is copied by cp.async while tile j
  // is computed on.
  static constexpr int kStages = 2;

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= kMaxHeadDim, "head dim must be a multiple of 32 up to kMaxHeadDim");
  static_assert(kBlockM == 16 * kNWarps, "each warp owns 16 query rows");
  static_assert(kBlockN % 16 == 0, "kBlockN must be a multiple of 16");

  // 16-byte chunks (8 elements) per row.
  static constexpr int kChunksPerRow = kHeadDim / 8;
  // Padded layout: a row is kHeadDim + 8 elements, an odd number of 16-byte chunks
  // (kHeadDim / 8 is even). The 8 row addresses of one ldmatrix 8x8 matrix (same
  // logical chunk, 8 consecutive rows) then fall on 8 distinct 16-byte bank groups
  // for every head dim, including 96/160/224 whose rows are not a multiple of the
  // 128-byte XOR-swizzle period. Cost: 3% (D=256) to 25% (D=32) more smem.
  static constexpr int kSmemStride = kHeadDim + 8;
  static_assert((kSmemStride / 8) % 2 == 1, "row stride must be an odd number of 16-byte chunks");

  static constexpr int kQTileElems = kBlockM * kSmemStride;
  static constexpr int kKVTileElems = kBlockN * kSmemStride;
  // Q tile (also the output staging tile), then kStages K tiles, then kStages V tiles.
  static constexpr int kSmemElems = kQTileElems + 2 * kStages * kKVTileElems;
  static constexpr int kSmemBytes = kSmemElems * 2;
};

// Per head dim, tuned for sm_80/sm_90 register files (one 16-row slice per warp):
// registers a thread needs ~ Q kHeadDim/4 + O kHeadDim/2 + S kBlockN/2.
//   D <= 128: 128 x 64 tiles, 8 warps (S 32 regs, O <= 64, Q <= 32)
//   D  > 128: 128 x 32 tiles, 8 warps (S 16 regs, O <= 128): kBlockN is halved to
//             fit the register file. Q stays in registers up to D = 192 (252
//             registers, 0 spills); at D = 224 and 256 Q + O + S spilled (255
//             registers + 8 bytes), so those re-read Q fragments from shared memory
//             with ldmatrix every tile (kQInRegs = false; 250 registers, 0 spills).
// Shared memory: 128x64 at D=128 is 102 KB; 128x32 at D=256 is 132 KB (fits the
// 163 KB opt-in limit of sm_80 and 227 KB of sm_90).
template <int kHeadDim>
struct FwdConfig {
  using Traits = FwdTraits<kHeadDim, 128, (kHeadDim <= 128 ? 64 : 32), 8, (kHeadDim <= 192)>;
};

// A compile-time value of the 16-bit instantiation of Config (FwdConfig or
// BwdConfig) for a padded head dim, read by `get` from a Traits value (0 for a dim
// that has none): lets the launcher pick a kernel that fits the device and size
// grids for it.
template <template <int> class Config, typename Get>
inline constexpr int traits_value_for(int padded_dim, Get get) {
  switch (padded_dim) {
    case 32: return get(typename Config<32>::Traits{});
    case 64: return get(typename Config<64>::Traits{});
    case 96: return get(typename Config<96>::Traits{});
    case 128: return get(typename Config<128>::Traits{});
    case 160: return get(typename Config<160>::Traits{});
    case 192: return get(typename Config<192>::Traits{});
    case 224: return get(typename Config<224>::Traits{});
    case 256: return get(typename Config<256>::Traits{});
    default: return 0;
  }
}

// Dynamic shared memory of the instantiation.
template <template <int> class Config>
inline constexpr int smem_bytes_for(int padded_dim) {
  return traits_value_for<Config>(padded_dim, [](auto traits) { return decltype(traits)::kSmemBytes; });
}

inline constexpr int fwd_smem_bytes(int padded_dim) { return smem_bytes_for<FwdConfig>(padded_dim); }
// Query rows and keys a tile of the 16-bit forward (split-KV sizes its grid by them).
inline constexpr int fwd_block_m(int padded_dim) {
  return traits_value_for<FwdConfig>(padded_dim, [](auto traits) { return decltype(traits)::kBlockM; });
}
inline constexpr int fwd_block_n(int padded_dim) {
  return traits_value_for<FwdConfig>(padded_dim, [](auto traits) { return decltype(traits)::kBlockN; });
}

// ---------------------------------------------------------------- backward
//
// One shape serves both backward kernels: a kBlockN x kBlockM (keys x queries)
// tile of S^T, dP^T, P^T and dS^T computed by kNWarps = 8 warps. Field names
// match FwdTraits where load_tile / store_rows_warp read them (kHeadDim,
// kNThreads, kChunksPerRow, kSmemStride).
//   phase 1: warp w owns keys 16 (w % 4) .. +16 and queries 32 (w / 4) .. +32 of
//            S^T = K Q^T and dP^T = V dO^T; writes P^T and dS^T (16-bit) to smem.
//   phase 2: warp w owns keys 16 (w % 4) .. +16 and head-dim half w / 4 of the
//            dV and dK accumulators (registers): dV += P^T dO, dK += dS^T Q.
//   phase 3: warp w owns queries 16 (w % 4) .. +16 and head-dim half w / 4 of
//            dQ = dS K.
// Shared memory: the kernel's two fixed tiles (K, V in the dK/dV kernel; Q, dO
// in the dQ kernel), kStages copies of its two streamed tiles (Q, dO or K, V;
// kBlockM == kBlockN so all are the same size, padded rows as the forward), P^T
// and dS^T (kBlockN x (kBlockM + 8), an odd number of 16-byte chunks a row),
// then kStages copies of the per-query lse (base 2) and delta (the dQ kernel,
// whose query tile is fixed, uses stage 0).
template <int kHeadDim_, int kStages_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;  // queries a tile
  static constexpr int kBlockN = 64;  // keys a tile
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kStages_;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= kMaxHeadDim, "head dim must be a multiple of 32 up to kMaxHeadDim");
  static_assert(kBlockN == 64 && kBlockM == 64, "the warp layout assumes 64 x 64 tiles and 8 warps");

  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSmemStride = kHeadDim + 8;
  static_assert((kSmemStride / 8) % 2 == 1, "row stride must be an odd number of 16-byte chunks");
  static constexpr int kPStride = kBlockM + 8;  // 72 elements: 9 chunks
  static_assert((kPStride / 8) % 2 == 1, "P row stride must be an odd number of 16-byte chunks");

  static constexpr int kTileElems = kBlockM * kSmemStride;  // any of Q, dO, K, V
  static constexpr int kPTileElems = kBlockN * kPStride;
  // Element offsets: fixed tiles 0 and 1, then streamed tiles 0 and 1 of stage s
  // at kOffStream + s * kStreamStageElems (+ kTileElems), then P^T, dS^T.
  static constexpr int kOffFixed = 0;
  static constexpr int kOffStream = 2 * kTileElems;
  static constexpr int kStreamStageElems = 2 * kTileElems;
  static constexpr int kOffP = kOffStream + kStages * kStreamStageElems;
  static constexpr int kOffDS = kOffP + kPTileElems;
  static constexpr int kElems16 = kOffDS + kPTileElems;
  // Then fp32: lse2[kStages][kBlockM], delta[kStages][kBlockM].
  static constexpr int kSmemBytes = kElems16 * 2 + 2 * kStages * kBlockM * 4;

  // n8 tiles of the head dim a warp owns in phases 2 and 3 (half of kHeadDim).
  static constexpr int kNTilesHalfD = kHeadDim / 16;
};

// Double-buffer the streamed tiles where that still fits the 99 KB of sm_86/89:
// D <= 96 (D = 96 needs 99328 bytes). Larger dims load the next streamed tile
// after the previous one is done (the dK/dV kernel overlaps that load with its
// dQ phase); the one-stage D = 256 kernel needs 154 KB (sm_80 allows 163 KB,
// sm_90 227 KB). Two stages for D = 128/160 would fit sm_80/90 (124/148 KB) but
// not sm_86/89: a second instantiation for those is GPU-tuning work.
template <int kHeadDim>
struct BwdConfig {
  using Traits = BwdTraits<kHeadDim, (kHeadDim <= 96 ? 2 : 1)>;
};

inline constexpr int bwd_smem_bytes(int padded_dim) { return smem_bytes_for<BwdConfig>(padded_dim); }

}  // namespace flash
}  // namespace tfkernels
