// The register-tiled loop of the tile products (bf16_dot.cpp, f32_dot_kernels.h):
// sums sum_p A[i][p] . B[p][c] for C[m][cols], in blocks of 6 rows x kVectors
// vectors of columns held in accumulators (tile_isa.h: 6 x 4 zmm on AVX-512, 6 x 2
// ymm on AVX2), leaving registers for the B vectors and the broadcast A element. A is
// addressed through a row and a step stride, so a transposed operand (P^T, dS^T) is
// read in place; B rows are `ldb` elements apart and the last vector of a row is read
// under a lane mask.
//
// A `Kind` says what one reduction step is:
//   using Isa                        the vector registers (tile_isa.h)
//   using A, B                       the operands' element types
//   static Isa::Bits broadcast(const A*)   A[i][p] in every 32-bit lane
//   static Isa::Vec step(Isa::Vec acc, Isa::Bits a, Isa::Bits b)   acc + a . b
// An `Out` says where a tile's sums go (StoreF32 below: alpha * sum, added to C or
// over it; StoreF32LaneMax: over C, keeping each row's max; bf16_dot.cpp's StoreBf16:
// sum + bias rounded to bf16):
//   Out at(int64_t row, int64_t col) const    the same output from C[row][col] on
//   template <bool kWhole> void store(int i, int z, Isa::Vec sum, Isa::Mask lanes) const
//                                    row i, vector z (kWhole: all lanes, as lanes says)
//   static constexpr bool kAccumulates   whether it can add to what it stored:
//   Out accumulating() const    then the output of the reduction's later blocks;
//                               without it gemm_panels runs the reduction in one block
// Include only from a .cpp that defines TFK_TILE_TARGET as the target attribute of
// the Kind's instructions: every function here is compiled for it, and the callers
// run them only after checking that the CPU has them. Everything is in an unnamed
// namespace: two files that compile it for different instruction sets must not share
// a definition.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/tile_isa.h"

#ifndef TFK_TILE_TARGET
#error "define TFK_TILE_TARGET (the target attribute) before including tile_gemm.h"
#endif

namespace tfkernels::cpu::tile_gemm {
namespace {

constexpr int kRows = 6;
// Columns per panel of a packed operand (f32dot::PackedB): the AVX-512 micro-tile's
// width, and four of AVX2's.
constexpr int64_t kPanelCols = 64;

// C (fp32, row-major) = alpha * sum (+ C when accumulate).
template <class Isa>
struct StoreF32 {
  static constexpr bool kAccumulates = true;
  float* c;
  int64_t ldc;
  float alpha;
  bool accumulate;
  StoreF32 at(int64_t row, int64_t col) const { return {c + row * ldc + col, ldc, alpha, accumulate}; }
  StoreF32 accumulating() const { return {c, ldc, alpha, true}; }
  // A whole vector goes through plain loads and stores: AVX2's masked ones
  // (vmaskmovps) are slow on AMD, a store most of all.
  template <bool kWhole>
  TFK_TILE_TARGET void store(int i, int z, typename Isa::Vec sum, typename Isa::Mask lanes) const {
    float* dst = c + i * ldc + Isa::kLanes * z;
    const auto base = !accumulate ? Isa::zero() : kWhole ? Isa::load(dst) : Isa::load(dst, lanes);
    const auto result = alpha == 1.0f ? Isa::add(base, sum) : Isa::fmadd(Isa::set1(alpha), sum, base);
    if constexpr (kWhole) {
      Isa::store(dst, result);
    } else {
      Isa::store(dst, lanes, result);
    }
  }
};

// C (fp32, row-major) = sum, and each row's running maximum of what it stores kept
// lane by lane in lane_max[row][Isa::kLanes] (the lanes past a masked tail count as
// -inf): the softmax's row max comes out of the registers that hold the scores
// instead of a second pass over the tile. A NaN score may or may not reach it
// (vmaxps returns its second operand on NaN); the caller's sum keeps NaN either way.
template <class Isa>
struct StoreF32LaneMax {
  static constexpr bool kAccumulates = false;
  float* c;
  int64_t ldc;
  float* lane_max;
  StoreF32LaneMax at(int64_t row, int64_t col) const {
    return {c + row * ldc + col, ldc, lane_max + row * Isa::kLanes};
  }
  template <bool kWhole>
  TFK_TILE_TARGET void store(int i, int z, typename Isa::Vec sum, typename Isa::Mask lanes) const {
    float* dst = c + i * ldc + Isa::kLanes * z;
    if constexpr (kWhole) {
      Isa::store(dst, sum);
    } else {
      Isa::store(dst, lanes, sum);
    }
  }
  // Row i's stored vectors, max-reduced into one (the micro-kernel calls this once a
  // row: a load and a store per row rather than per vector).
  TFK_TILE_TARGET void keep_max(int i, typename Isa::Vec row_max) const {
    float* running = lane_max + i * Isa::kLanes;
    Isa::store(running, Isa::max(Isa::load(running), row_max));
  }
};

// MR rows x NZ vectors; kMaskedTail: the last vector is read and stored under `tail`
// (otherwise it is whole, and read with a plain load). kPrefetch: each step also
// prefetches the same row segment of `next` (the next block of columns' B).
template <class Kind, int MR, int NZ, bool kMaskedTail, class Out, bool kPrefetch = false>
TFK_TILE_TARGET inline void micro_kernel(int64_t steps, const typename Kind::A* a, int64_t a_row, int64_t a_step,
                                         const typename Kind::B* b, int64_t ldb, const Out& out,
                                         typename Kind::Isa::Mask tail, const typename Kind::B* next = nullptr) {
  using Isa = typename Kind::Isa;
  typename Isa::Vec acc[MR][NZ];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) acc[i][z] = Isa::zero();
  }
  for (int64_t p = 0; p < steps; ++p) {
    if constexpr (kPrefetch) {
      // First and last byte of the segment: it may straddle two cache lines.
      const char* segment = reinterpret_cast<const char*>(next + p * ldb);
      __builtin_prefetch(segment, 0, 3);
      __builtin_prefetch(segment + sizeof(*next) * Isa::kLanes * NZ - 1, 0, 3);
    }
    typename Isa::Bits bv[NZ];
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) {
      const auto* row = b + p * ldb + Isa::kLanes * z;
      bv[z] = kMaskedTail && z == NZ - 1 ? Isa::load_bits(row, tail) : Isa::load_bits(row);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const auto av = Kind::broadcast(a + i * a_row + p * a_step);
#pragma GCC unroll 4
      for (int z = 0; z < NZ; ++z) acc[i][z] = Kind::step(acc[i][z], av, bv[z]);
    }
  }
  const auto whole = Isa::first(Isa::kLanes);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 3
    for (int z = 0; z < NZ - 1; ++z) out.template store<true>(i, z, acc[i][z], whole);
    out.template store<!kMaskedTail>(i, NZ - 1, acc[i][NZ - 1], tail);
    if constexpr (requires { out.keep_max(i, acc[i][0]); }) {
      auto row_max = kMaskedTail ? Isa::or_fill(acc[i][NZ - 1], tail, -__builtin_inff()) : acc[i][NZ - 1];
#pragma GCC unroll 3
      for (int z = 0; z < NZ - 1; ++z) row_max = Isa::max(acc[i][z], row_max);
      out.keep_max(i, row_max);
    }
  }
}

// All m rows of one block of NZ vectors of columns; the first full micro-tile
// prefetches `next` (Isa::kPrefetchNextColumns), when given.
template <class Kind, int NZ, bool kMaskedTail, class Out>
TFK_TILE_TARGET void column_block(int64_t m, int64_t steps, const typename Kind::A* a, int64_t a_row, int64_t a_step,
                                  const typename Kind::B* b, int64_t ldb, const Out& out,
                                  typename Kind::Isa::Mask tail, const typename Kind::B* next) {
  int64_t i = 0;
  if constexpr (Kind::Isa::kPrefetchNextColumns) {
    if (next && m >= kRows) {
      micro_kernel<Kind, kRows, NZ, kMaskedTail, Out, true>(steps, a, a_row, a_step, b, ldb, out, tail, next);
      i = kRows;
    }
  }
  // A last 1 or 2 rows join the last full micro-tile's 6 as 4 + 3 or 4 + 4: a 1- or
  // 2-row tile loads the B vectors for 4 or 8 FMAs a step, a 3- or 4-row one for 12 or
  // 16 (each row's sums are the same either way).
  const int64_t rest_rows = m % kRows;
  const int64_t full_end = m - rest_rows - (rest_rows > 0 && rest_rows < 3 && m > kRows ? kRows : 0);
  for (; i + kRows <= full_end; i += kRows) {
    micro_kernel<Kind, kRows, NZ, kMaskedTail>(steps, a + i * a_row, a_row, a_step, b, ldb, out.at(i, 0), tail);
  }
  if (m - i > kRows) {
    micro_kernel<Kind, 4, NZ, kMaskedTail>(steps, a + i * a_row, a_row, a_step, b, ldb, out.at(i, 0), tail);
    i += 4;
  }
  a += i * a_row;
  const Out rest = out.at(i, 0);
  switch (m - i) {
    case 1: micro_kernel<Kind, 1, NZ, kMaskedTail>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 2: micro_kernel<Kind, 2, NZ, kMaskedTail>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 3: micro_kernel<Kind, 3, NZ, kMaskedTail>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 4: micro_kernel<Kind, 4, NZ, kMaskedTail>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 5: micro_kernel<Kind, 5, NZ, kMaskedTail>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    default: break;
  }
}

// column_block for the `vectors` (1 .. Isa::kVectors) a block of columns needs.
template <class Kind, bool kMaskedTail, class Out>
TFK_TILE_TARGET void column_block_of(int vectors, int64_t m, int64_t steps, const typename Kind::A* a, int64_t a_row,
                                     int64_t a_step, const typename Kind::B* b, int64_t ldb, const Out& out,
                                     typename Kind::Isa::Mask tail, const typename Kind::B* next) {
  static_assert(Kind::Isa::kVectors == 2 || Kind::Isa::kVectors == 4, "micro-tiles of 2 or 4 vectors");
  if constexpr (Kind::Isa::kVectors == 2) {
    if (vectors == 1) return column_block<Kind, 1, kMaskedTail>(m, steps, a, a_row, a_step, b, ldb, out, tail, next);
    return column_block<Kind, 2, kMaskedTail>(m, steps, a, a_row, a_step, b, ldb, out, tail, next);
  } else {
    switch (vectors) {
      case 1: return column_block<Kind, 1, kMaskedTail>(m, steps, a, a_row, a_step, b, ldb, out, tail, next);
      case 2: return column_block<Kind, 2, kMaskedTail>(m, steps, a, a_row, a_step, b, ldb, out, tail, next);
      case 3: return column_block<Kind, 3, kMaskedTail>(m, steps, a, a_row, a_step, b, ldb, out, tail, next);
      default: return column_block<Kind, 4, kMaskedTail>(m, steps, a, a_row, a_step, b, ldb, out, tail, next);
    }
  }
}

// out[m][cols] receives sum_p A[i][p] . B[p][c]; B rows ldb elements apart.
template <class Kind, class Out>
TFK_TILE_TARGET void gemm_to(int64_t m, int64_t cols, int64_t steps, const typename Kind::A* a, int64_t a_row,
                             int64_t a_step, const typename Kind::B* b, int64_t ldb, const Out& out) {
  using Isa = typename Kind::Isa;
  constexpr int64_t kWidth = Isa::kLanes * Isa::kVectors;
  for (int64_t c0 = 0; c0 < cols; c0 += kWidth) {
    const int64_t width = std::min(kWidth, cols - c0);
    const int vectors = static_cast<int>((width + Isa::kLanes - 1) / Isa::kLanes);
    const int64_t last = width - Isa::kLanes * (vectors - 1);
    const auto tail = Isa::first(last);
    const auto* bc = b + c0;
    const Out oc = out.at(0, c0);
    // (A prefetch past the end of B is harmless: it never faults.)
    const auto* next = Isa::kPrefetchNextColumns && c0 + kWidth < cols ? bc + kWidth : nullptr;
    if constexpr (Isa::kMaskedLoadsAreFree) {
      column_block_of<Kind, true>(vectors, m, steps, a, a_row, a_step, bc, ldb, oc, tail, next);
    } else if (last < Isa::kLanes) {
      column_block_of<Kind, true>(vectors, m, steps, a, a_row, a_step, bc, ldb, oc, tail, next);
    } else {
      column_block_of<Kind, false>(vectors, m, steps, a, a_row, a_step, bc, ldb, oc, tail, next);
    }
  }
}

// C[m][cols] = alpha * A . B (+ C if accumulate), fp32 C.
template <class Kind>
TFK_TILE_TARGET void gemm(int64_t m, int64_t cols, int64_t steps, const typename Kind::A* a, int64_t a_row,
                          int64_t a_step, const typename Kind::B* b, int64_t ldb, float alpha, float* c, int64_t ldc,
                          bool accumulate) {
  gemm_to<Kind>(m, cols, steps, a, a_row, a_step, b, ldb,
                StoreF32<typename Kind::Isa>{c, ldc, alpha, accumulate});
}

// gemm_to over an operand B packed in panels of kPanelCols columns ([panel][step]
// [kPanelCols] elements, one panel every panel_stride elements; f32dot::PackedB):
// out[m][cols] receives A . B[k0 : k0 + depth][c0 : c0 + cols], A's step 0 meeting
// B's step k0. Column segments may start inside a panel; the reduction runs in blocks
// of block_steps, the later blocks' sums added to the first's (so a result does not
// depend on how a caller splits the columns), or in one block for an output that
// cannot accumulate.
template <class Kind, class Out>
TFK_TILE_TARGET void gemm_panels(int64_t m, int64_t cols, int64_t depth, const typename Kind::A* a, int64_t a_row,
                                 int64_t a_step, const typename Kind::B* panels, int64_t panel_stride, int64_t k0,
                                 int64_t c0, int64_t block_steps, const Out& out) {
  if constexpr (!Out::kAccumulates) block_steps = std::max<int64_t>(depth, 1);
  for (int64_t col = c0; col < c0 + cols;) {
    const int64_t offset = col % kPanelCols;
    const int64_t width = std::min(kPanelCols - offset, c0 + cols - col);
    const auto* base = panels + (col / kPanelCols) * panel_stride + offset;
    const Out first = out.at(0, col - c0);
    for (int64_t p = 0; p < depth; p += block_steps) {
      const auto* a_block = a + p * a_step;
      const auto* b_block = base + (k0 + p) * kPanelCols;
      const int64_t steps = std::min(block_steps, depth - p);
      if constexpr (Out::kAccumulates) {
        gemm_to<Kind>(m, width, steps, a_block, a_row, a_step, b_block, kPanelCols,
                      p > 0 ? first.accumulating() : first);
      } else {
        gemm_to<Kind>(m, width, steps, a_block, a_row, a_step, b_block, kPanelCols, first);
      }
    }
    col += width;
  }
}

}  // namespace
}  // namespace tfkernels::cpu::tile_gemm
