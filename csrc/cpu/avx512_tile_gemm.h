// The register-tiled loop of the AVX-512 tile products (bf16_dot.cpp, f32_dot.cpp):
// sums sum_p A[i][p] . B[p][c] for C[m][cols], in blocks of 6 rows x 64
// columns held in 24 zmm accumulators, leaving registers for the 4 B vectors and the
// broadcast A element (32 in all). A is addressed through a row and a step stride,
// so a transposed operand (P^T, dS^T) is read in place; B rows are `ldb` elements
// apart and the last vector of a row is read under a lane mask.
//
// A `Kind` says what one reduction step is:
//   using A, B                       the operands' element types
//   static __m512i broadcast(const A*)   A[i][p] in every 32-bit lane
//   static __m512 step(__m512 acc, __m512i a, __m512i b)   acc + a . b
// An `Out` says where a tile's sums go (StoreF32 below: alpha * sum, added to C or
// over it; bf16_dot.cpp's StoreBf16: sum + bias rounded to bf16):
//   Out at(int64_t row, int64_t col) const    the same output from C[row][col] on
//   void store(int i, int z, __m512 sum, __mmask16 lanes) const   row i, vector z
//   static constexpr bool kAccumulates   whether it can add to what it stored:
//   Out accumulating() const    then the output of the reduction's later blocks;
//                               without it gemm_panels runs the reduction in one block
// Include only from a .cpp that defines TFK_TILE_TARGET as the target attribute of
// the Kind's instructions: every function here is compiled for it, and the callers
// run them only after checking that the CPU has them.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#ifndef TFK_TILE_TARGET
#error "define TFK_TILE_TARGET (the target attribute) before including avx512_tile_gemm.h"
#endif

namespace tfkernels::cpu::tile_gemm {

constexpr int kRows = 6;
constexpr int kMaxVectors = 4;

// C (fp32, row-major) = alpha * sum (+ C when accumulate).
struct StoreF32 {
  static constexpr bool kAccumulates = true;
  float* c;
  int64_t ldc;
  float alpha;
  bool accumulate;
  StoreF32 at(int64_t row, int64_t col) const { return {c + row * ldc + col, ldc, alpha, accumulate}; }
  StoreF32 accumulating() const { return {c, ldc, alpha, true}; }
  TFK_TILE_TARGET void store(int i, int z, __m512 sum, __mmask16 lanes) const {
    float* dst = c + i * ldc + 16 * z;
    const __m512 base = accumulate ? _mm512_maskz_loadu_ps(lanes, dst) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(dst, lanes, alpha == 1.0f ? _mm512_add_ps(base, sum)
                                                    : _mm512_fmadd_ps(_mm512_set1_ps(alpha), sum, base));
  }
};

template <class Kind, int MR, int NZ, class Out>
TFK_TILE_TARGET inline void micro_kernel(int64_t steps, const typename Kind::A* a, int64_t a_row, int64_t a_step,
                                         const typename Kind::B* b, int64_t ldb, const Out& out, __mmask16 tail) {
  __m512 acc[MR][NZ];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < steps; ++p) {
    __m512i bv[NZ];
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) {
      const __mmask16 lanes = z == NZ - 1 ? tail : __mmask16(0xFFFF);
      bv[z] = _mm512_maskz_loadu_epi32(lanes, b + p * ldb + 16 * z);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i av = Kind::broadcast(a + i * a_row + p * a_step);
#pragma GCC unroll 4
      for (int z = 0; z < NZ; ++z) acc[i][z] = Kind::step(acc[i][z], av, bv[z]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) out.store(i, z, acc[i][z], z == NZ - 1 ? tail : __mmask16(0xFFFF));
  }
}

// All m rows of one block of NZ vectors of columns.
template <class Kind, int NZ, class Out>
TFK_TILE_TARGET void column_block(int64_t m, int64_t steps, const typename Kind::A* a, int64_t a_row, int64_t a_step,
                                  const typename Kind::B* b, int64_t ldb, const Out& out, __mmask16 tail) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    micro_kernel<Kind, kRows, NZ>(steps, a + i * a_row, a_row, a_step, b, ldb, out.at(i, 0), tail);
  }
  a += i * a_row;
  const Out rest = out.at(i, 0);
  switch (m - i) {
    case 1: micro_kernel<Kind, 1, NZ>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 2: micro_kernel<Kind, 2, NZ>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 3: micro_kernel<Kind, 3, NZ>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 4: micro_kernel<Kind, 4, NZ>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    case 5: micro_kernel<Kind, 5, NZ>(steps, a, a_row, a_step, b, ldb, rest, tail); break;
    default: break;
  }
}

// out[m][cols] receives sum_p A[i][p] . B[p][c]; B rows ldb elements apart.
template <class Kind, class Out>
TFK_TILE_TARGET void gemm_to(int64_t m, int64_t cols, int64_t steps, const typename Kind::A* a, int64_t a_row,
                             int64_t a_step, const typename Kind::B* b, int64_t ldb, const Out& out) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16 * kMaxVectors) {
    const int64_t width = std::min<int64_t>(16 * kMaxVectors, cols - c0);
    const int vectors = static_cast<int>((width + 15) / 16);
    const int last = static_cast<int>(width - 16 * (vectors - 1));
    const auto tail = static_cast<__mmask16>((1u << last) - 1);
    const auto* bc = b + c0;
    const Out oc = out.at(0, c0);
    switch (vectors) {
      case 1: column_block<Kind, 1>(m, steps, a, a_row, a_step, bc, ldb, oc, tail); break;
      case 2: column_block<Kind, 2>(m, steps, a, a_row, a_step, bc, ldb, oc, tail); break;
      case 3: column_block<Kind, 3>(m, steps, a, a_row, a_step, bc, ldb, oc, tail); break;
      default: column_block<Kind, 4>(m, steps, a, a_row, a_step, bc, ldb, oc, tail); break;
    }
  }
}

// C[m][cols] = alpha * A . B (+ C if accumulate), fp32 C.
template <class Kind>
TFK_TILE_TARGET void gemm(int64_t m, int64_t cols, int64_t steps, const typename Kind::A* a, int64_t a_row,
                          int64_t a_step, const typename Kind::B* b, int64_t ldb, float alpha, float* c, int64_t ldc,
                          bool accumulate) {
  gemm_to<Kind>(m, cols, steps, a, a_row, a_step, b, ldb, StoreF32{c, ldc, alpha, accumulate});
}

// gemm_to over an operand B packed in panels of 64 columns ([panel][step][64]
// elements, one panel every panel_stride elements; f32dot::PackedB): out[m][cols]
// receives A . B[k0 : k0 + depth][c0 : c0 + cols], A's step 0 meeting B's step k0.
// Column segments may start inside a panel; the reduction runs in blocks of
// block_steps, the later blocks' sums added to the first's (so a result does not
// depend on how a caller splits the columns), or in one block for an output that
// cannot accumulate.
template <class Kind, class Out>
TFK_TILE_TARGET void gemm_panels(int64_t m, int64_t cols, int64_t depth, const typename Kind::A* a, int64_t a_row,
                                 int64_t a_step, const typename Kind::B* panels, int64_t panel_stride, int64_t k0,
                                 int64_t c0, int64_t block_steps, const Out& out) {
  constexpr int64_t kWidth = 16 * kMaxVectors;
  if constexpr (!Out::kAccumulates) block_steps = std::max<int64_t>(depth, 1);
  for (int64_t col = c0; col < c0 + cols;) {
    const int64_t offset = col % kWidth;
    const int64_t width = std::min(kWidth - offset, c0 + cols - col);
    const auto* base = panels + (col / kWidth) * panel_stride + offset;
    const Out first = out.at(0, col - c0);
    for (int64_t p = 0; p < depth; p += block_steps) {
      const auto* a_block = a + p * a_step;
      const auto* b_block = base + (k0 + p) * kWidth;
      const int64_t steps = std::min(block_steps, depth - p);
      if constexpr (Out::kAccumulates) {
        gemm_to<Kind>(m, width, steps, a_block, a_row, a_step, b_block, kWidth, p > 0 ? first.accumulating() : first);
      } else {
        gemm_to<Kind>(m, width, steps, a_block, a_row, a_step, b_block, kWidth, first);
      }
    }
    col += width;
  }
}

}  // namespace tfkernels::cpu::tile_gemm
