// fp32 GEMMs on AVX-512: tile products for the CPU flash attention (forward and
// backward), in place of one sgemm call per tile product, and whole GEMMs with
// packed panels for the fused GEMM ops. A library GEMM packs both operands
// on every call; here K and V are transposed once per key tile (`pack_transposed`)
// and every other operand (Q, dO, P, dS, V, K) is read in place, P^T and dS^T
// through strides. The register tiling is shared with bf16_dot (avx512_tile_gemm.h).
#pragma once

#include <cstdint>

namespace tfkernels::cpu::f32dot {

// Whether the CPU has AVX-512 (F) and TFKERNELS_CPU_F32_DOT is not 0 (read on every
// call: tests force the sgemm path with it).
bool available();

// Columns per packed row for `cols` columns (a multiple of 16: whole vectors).
inline int64_t packed_ld(int64_t cols) { return (cols + 15) / 16 * 16; }

// dst[c * ldp + j] = src[j * ld + c] for j < n, c < cols; columns n .. packed_ld(n)
// of dst are zero, the rest of its rows untouched (ldp >= packed_ld(n)). (K -> K^T,
// V -> V^T for S = Q K^T and dP = dO V^T.)
void pack_transposed(const float* src, int64_t ld, int64_t n, int64_t cols, float* dst, int64_t ldp);

// C[i][c] = alpha * sum over p < depth of A[i][p] B[p][c] (+ C[i][c] if accumulate),
// for i < m, c < cols; A[i][p] = a[i * a_row + p * a_step] (a_row = lda, a_step = 1
// for a row-major A; a_row = 1, a_step = lda for a transposed one); B rows are ldb
// apart (only `cols` elements of each are read).
void gemm(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t a_row, int64_t a_step, const float* b,
          int64_t ldb, float alpha, float* c, int64_t ldc, bool accumulate);

// Row-major C[m][n] = alpha op(A) op(B) (+ C if accumulate), op(X) = X or X^T as
// gemm_rm (blas.h) takes them, for operands of any size: op(B) is packed in panels
// of 128 reduction steps x 64 columns (contiguous, so the micro-kernel's loads stay
// in a few pages; transposed on the way when trans_b), op(A) read through strides.
// One thread; blas.h's gemm_rm and mm_out_cpu call it where available().
void gemm_packed(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

}  // namespace tfkernels::cpu::f32dot
