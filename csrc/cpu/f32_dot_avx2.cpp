// f32_dot's kernels compiled for AVX2 with FMA3 (8 lanes: micro-tiles of 6 rows x 16
// columns) through target attributes: the rest of the library keeps its baseline ISA,
// and f32_dot.cpp runs these only on a CPU that has it.
#include "cpu/f32_dot_backend.h"

#include "cpu/tile_isa.h"

#ifdef TFK_HAVE_TILE_ISA
#define TFK_TILE_TARGET __attribute__((target("avx2,fma")))
#include "cpu/f32_dot_kernels.h"
#endif

namespace tfkernels::cpu::f32dot {

const Backend* avx2_backend() {
#ifdef TFK_HAVE_TILE_ISA
  static const Backend kernels = Kernels<tile_isa::Avx2>::backend("avx2", false);
  return &kernels;
#else
  return nullptr;
#endif
}

}  // namespace tfkernels::cpu::f32dot
