// The launch of the GEMM core: grid size, dynamic shared memory, the tile shape and
// the main loop a GEMM runs on. Included by the instantiation files (through
// qkv_impl.cuh, mlp_impl.cuh). CUDA headers only.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "cuda/common/smem_opt_in.h"
#include "cuda/gemm/gemm_params.h"
#include "cuda/gemm/gemm_traits.h"
#include "cuda/gemm/mainloop_generic.cuh"
#include "cuda/gemm/mainloop_tc.cuh"
#include "cuda/gemm/tile_size.h"

namespace tfkernels {
namespace gemm {

// One CTA a tile on a 1-D grid (tile_scheduler.h rasterises it).
template <class Traits, class Tile>
cudaError_t launch_tc(const Operand& a, const Operand& b, int M, int N, int K, const typename Traits::Epilogue& ep,
                      cudaStream_t stream) {
  const auto p = Traits::make_params(a, b, M, N, K, Tile::BM, Tile::BN);
  const int64_t tiles = static_cast<int64_t>(p.tiles_m) * p.tiles_n;
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = gemm_tc_kernel<Traits, Tile>;
  static cuda::DynamicSmemOptIn opt_in;  // one per instantiation
  const cudaError_t err = opt_in.apply(kernel, static_cast<int>(Tile::kSmemBytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(tiles), Tile::kThreads, Tile::kSmemBytes, stream>>>(p, ep);
  return cudaGetLastError();
}

template <class Traits, bool kTf32>
cudaError_t launch_generic(const Operand& a, const Operand& b, int M, int N, int K,
                           const typename Traits::Epilogue& ep, cudaStream_t stream) {
  const auto p = Traits::make_params(a, b, M, N, K, GenericTile::BM, GenericTile::BN);
  const int64_t tiles = static_cast<int64_t>(p.tiles_m) * p.tiles_n;
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  gemm_generic_kernel<Traits, kTf32><<<static_cast<unsigned>(tiles), GenericTile::kThreads, 0, stream>>>(p, ep);
  return cudaGetLastError();
}

// The heuristic of tile_size.h picks the tile unless config.tile_override (a
// TileShape, from TFKERNELS_GEMM_TILE: tests and benchmarks) forces one; kAllowLarge
// compiles the 128x256 shape (without it, 128x256 falls back to 128x128). A shape
// whose smem exceeds the device's opt-in limit (max_smem; e.g. 99 KiB on sm_86/sm_89,
// where the sm_80 code runs) steps down to the next smaller one, and to the generic
// kernel if none fits.
template <class Traits, bool kAllowLarge>
cudaError_t launch_tc_auto(const Operand& a, const Operand& b, int M, int N, int K,
                           const typename Traits::Epilogue& ep, const DeviceConfig& config, cudaStream_t stream) {
  const size_t limit = config.max_smem > 0 ? config.max_smem : SIZE_MAX;  // 0: unknown, no limit
  TileShape shape = config.tile_override >= 0 ? static_cast<TileShape>(config.tile_override)
                                              : pick_tile_shape(M, N, config.num_sms, kAllowLarge);
  if (shape == TileShape::k128x256 && (!kAllowLarge || TileL::kSmemBytes > limit)) shape = TileShape::k128x128;
  if (shape == TileShape::k128x128 && TileM::kSmemBytes > limit) shape = TileShape::k64x128;
  if (TileS::kSmemBytes > limit) return launch_generic<Traits, false>(a, b, M, N, K, ep, stream);
  switch (shape) {
    case TileShape::k128x256:
      if constexpr (kAllowLarge) return launch_tc<Traits, TileL>(a, b, M, N, K, ep, stream);
      [[fallthrough]];
    case TileShape::k128x128:
      return launch_tc<Traits, TileM>(a, b, M, N, K, ep, stream);
    default:
      return launch_tc<Traits, TileS>(a, b, M, N, K, ep, stream);
  }
}

// One GEMM, C = A B^T, on the main loop the arguments allow: 16-bit with
// config.vector_ok -> tensor cores (launch_tc_auto); 16-bit otherwise -> the generic
// kernel; fp32 -> the generic kernel, TF32 mma when config.tf32, else exact FMA.
template <class Traits, bool kAllowLarge>
cudaError_t launch_gemm(const Operand& a, const Operand& b, int M, int N, int K, const typename Traits::Epilogue& ep,
                        const DeviceConfig& config, cudaStream_t stream) {
  if constexpr (sizeof(typename Traits::Element) == 2) {
    if (config.vector_ok) return launch_tc_auto<Traits, kAllowLarge>(a, b, M, N, K, ep, config, stream);
  } else {
    if (config.tf32) return launch_generic<Traits, true>(a, b, M, N, K, ep, stream);
  }
  return launch_generic<Traits, false>(a, b, M, N, K, ep, stream);
}

}  // namespace gemm
}  // namespace tfkernels
