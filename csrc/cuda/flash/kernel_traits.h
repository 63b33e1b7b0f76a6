// Compile-time tile shapes and shared-memory layout of the tensor-core flash
// attention kernels (fp16/bf16). The backward is meant to reuse the layout: a
// tile is `rows` x kHeadDim elements stored with a padded row stride, loaded by
// load_tile() in flash_tile.h and read by ldmatrix (plain or .trans).
#pragma once

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

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dim must be a multiple of 32 up to 256");
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

// Dynamic shared memory of the 16-bit forward instantiation for a padded head dim
// (0 for a dim that has none): lets the launcher pick a kernel that fits the device.
inline constexpr int fwd_smem_bytes(int padded_dim) {
  switch (padded_dim) {
    case 32: return FwdConfig<32>::Traits::kSmemBytes;
    case 64: return FwdConfig<64>::Traits::kSmemBytes;
    case 96: return FwdConfig<96>::Traits::kSmemBytes;
    case 128: return FwdConfig<128>::Traits::kSmemBytes;
    case 160: return FwdConfig<160>::Traits::kSmemBytes;
    case 192: return FwdConfig<192>::Traits::kSmemBytes;
    case 224: return FwdConfig<224>::Traits::kSmemBytes;
    case 256: return FwdConfig<256>::Traits::kSmemBytes;
    default: return 0;
  }
}

}  // namespace flash
}  // namespace tfkernels
