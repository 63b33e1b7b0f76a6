// Tile GEMMs on AMX-BF16 (Sapphire Rapids and later Xeons): one TDPBF16PS adds a
// 16 x 32 bf16 block of A times a 32 x 16 block of B into a 16 x 16 fp32 tile, 16
// times the products of an AVX512-BF16 instruction, on the core's matrix unit.
// bf16_dot.h's `gemm` hands its products with row-major A to `gemm` here when the
// CPU has AMX (`available()`): the CPU attention's S = Q K^T, O += P V, and the
// backward's dP = dO V^T and dQ += dS K.
//
// Operands as bf16_dot.h lays them out: A rows of bf16 pairs (a row-major bf16
// matrix of even row length, read as 32-bit words), B packed pair-major (B[p][c] the
// word of reduction pairs 2p, 2p+1 for column c, ldb words per row, the columns past
// `cols` zero up to a multiple of 16). That pair-major B is the matrix unit's own
// B layout, so a B tile loads from it in place.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace tfkernels::cpu::amx {

// Whether the CPU has AMX-BF16, Linux granted this process the tile state
// (arch_prctl), and TFKERNELS_CPU_AMX is not 0 (read on every call: tests run the
// AVX512-BF16 tiles on AMX machines with it).
bool available();

// C[m][cols] = (C if accumulate) + sum over p < pairs of A[i][p] . B[p][c], where
// A[i][p] is the word of bf16 elements a[i * lda + 2p] and the next one, and B is
// packed with ldb >= cols rounded up to 16. fp32 accumulation. With row_max (not null),
// also row_max[i] = max_j C[i][j], read back while each block of C is in L1 (the
// attention forward's running max without a pass over S; a NaN may be dropped, as
// by f32dot::gemm_row_max). One thread; only after available().
void gemm(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t lda, const uint32_t* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate, float* row_max = nullptr);

}  // namespace tfkernels::cpu::amx
