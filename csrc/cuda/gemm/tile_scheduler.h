// Rasterisation of the GEMM grid: which C tile a CTA of the 1-D grid computes.
// Shared by both main loops. CUDA headers only.
#pragma once

#include <cuda_runtime.h>

namespace tfkernels {
namespace gemm {

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

}  // namespace gemm
}  // namespace tfkernels
