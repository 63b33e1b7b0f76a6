// Tile GEMMs on bf16 operands with AVX512-BF16's vdpbf16ps: each instruction adds
// 16 sums of two bf16 products into fp32 lanes, twice the products per cycle of an
// fp32 FMA and without widening the operands first. The CPU flash attention's
// forward runs S = Q K^T and O += P V on them when its inputs are bf16 and the CPU
// has the instruction (`available()`); elsewhere it widens tiles to fp32 (f32_dot.h
// or sgemm).
//
// The instruction pairs elements along the reduction dim, so the B operand is packed
// "pair-major": B[p][c] is one 32-bit word holding the two bf16 values of reduction
// pairs 2p, 2p+1 for output column c. A is read as rows of such words (a bf16 row
// of even length viewed as 32-bit words) and each word is broadcast.
//   S = Q K^T: A = Q rows (pairs over D), B = K packed by `pack_transposed` (column
//   c = key c); D must be even.
//   O += P V: A = P rounded to bf16 by `round_rows` (pairs over keys), B = V packed
//   by `pack_row_pairs` (column c = head-dim element c).
// The backward's products take the same forms; where the reduction runs over query
// rows (dV += P^T dO, dK += dS^T Q) the A operand is P or dS packed into pairs of rows
// by `round_row_pairs` and read transposed.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu/f32_dot.h"

namespace tfkernels::cpu::bf16dot {

// Whether the CPU has AVX512-BF16 and TFKERNELS_CPU_BF16_DOT is not 0 (read on every
// call: tests force the fp32 path with it).
bool available();

// Words per packed row that `cols` columns need (a multiple of 16: whole vectors).
inline int64_t packed_ld(int64_t cols) { return (cols + 15) / 16 * 16; }

// dst[p * ldp + j] = the word of src row j holding elements 2p, 2p+1, for j < n and
// p < pairs; columns n .. ldp are zero. Rows are `ld` elements apart.
void pack_transposed(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t pairs, uint32_t* dst, int64_t ldp);

// dst[p * ldp + c] = (src[2p][c], src[2p+1][c]) for c < cols and 2p < n (a missing
// row 2p+1 reads as 0); columns cols .. ldp are zero. Returns whether every element
// of src is finite (a zero probability times an Inf value would be NaN).
bool pack_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t cols, uint32_t* dst, int64_t ldp);

// dst[r][j] = bf16(src[r][j]) (round to nearest even) for j < n, and dst[r][n] = 0
// when n is odd, so that a row is a whole number of pairs.
void round_rows(const float* src, int64_t lds, int64_t rows, int64_t n, c10::BFloat16* dst, int64_t ldd);

// dst[c * ldd + r] = src[r * ld + c] for r < rows, c < cols, of any 16-bit type: the
// transpose of a rows x cols matrix, as 32-bit words (pairs of columns) through
// f32dot::pack_transposed, each word row then split into its two element rows.
// cols and ld even; `words` holds cols / 2 x f32dot::packed_ld(rows) words. Needs
// available().
void transpose16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd,
                 uint32_t* words);

// dst[j] = bf16(src[j] * scale) (round to nearest even, NaN kept) for j < n: the
// attention forward's output rows, O = acc / l. Per row; callers check available().
void scale_round_row(const float* src, int64_t n, float scale, c10::BFloat16* dst);

// The attention forward's probabilities straight from its scores, in one pass:
// p[j] = bf16(2^(s[j] c - m)) for j < n (nearest even; 0 where s[j] c - m < -126, NaN
// kept), vec_math.h's exp2_poly<4> shifted to the fraction x - floor(x) (2.7e-6
// relative, far below bf16's 2^-9). Returns the sum of the values before rounding,
// the softmax's l. Called per row, so it does not check the CPU: callers check
// available() once per call.
float exp2_round_row(const float* s, int64_t n, float c, float m, c10::BFloat16* p);

// pack_row_pairs of an fp32 tile, each value rounded to bf16 (nearest even): the
// transposed operand (P^T, dS^T) of a product that reduces over src's rows, read by
// `gemm` with a_row = 2 and a_pair = 2 * ldp.
void round_row_pairs(const float* src, int64_t lds, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldp);

// C[m][cols] = (C if accumulate) + sum over p < pairs of A[i][p] . B[p][c], where
// A[i][p] is the word of bf16 elements a[i * a_row + p * a_pair] and the next one
// (rows of pairs: a_row = the row stride, a_pair = 2), and B is packed (ldb words
// per row, ldb >= packed_ld(cols)). fp32 accumulation.
void gemm(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
          const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Whole GEMMs against a weight packed once (the fused ops' forwards, through blas.h's
// share_b / gemm_rm_shared): op(B) = W^T in pair-major panels of 64 columns, stored as
// an f32dot::PackedB of 32-bit words (k/2 pair steps x n columns), so the fp32 path's
// packing (16 x 16 transposes of 32-bit elements) and buffer reuse serve both.
//
// Whether they take a product with reduction length k: AVX512-BF16 without AMX-BF16
// (oneDNN's AMX tiles are far faster), available(), k even.
bool prepacked_applies(int64_t k);

// W (n x k, rows ldw elements apart, ldw even) packed as op(B) = W^T.
f32dot::PackedB pack_weight_transposed(const c10::BFloat16* w, int64_t ldw, int64_t k, int64_t n);

// B (k x n, row-major, rows ldb elements apart) packed as op(B) = B: the word of
// pair p, column c holds B[2p][c] and B[2p+1][c] (0 for a missing row 2p+1 when k is
// odd). In parallel over panels (at::parallel_for).
f32dot::PackedB pack_rows(const c10::BFloat16* b, int64_t ldb, int64_t k, int64_t n);

// C[m][cols] = sum over pairs p < pairs of A[i][p] . op(B)[p0 + p][c0 + c] (+ C if
// accumulate), where A[i][p] is the word of elements a[i * a_row + p * a_pair] and
// the next one (row-major A: a_row = lda, a_pair = 2; rows packed by pack_row_pairs:
// a_row = 2, a_pair = 2 * ldp); fp32 accumulation, each block of 512 pairs added to
// C (bf16_dot.cpp says why). One thread.
void gemm_prepacked(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
                    const f32dot::PackedB& b, int64_t p0, int64_t c0, float* c, int64_t ldc, bool accumulate);

// out[m][cols] = bf16(sum over pairs p < pairs of A[i][p] . op(B)[p0 + p][c0 + c]
// (+ bias[c] when bias is not null)), A as gemm_prepacked reads it, out row-major
// (rows ldo elements apart): the fp32 sum over the whole reduction rounded once in
// registers (nearest even), with no fp32 C in memory. pairs > 0. One thread.
void gemm_prepacked_rounded(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t a_row,
                            int64_t a_pair, const f32dot::PackedB& b, int64_t p0, int64_t c0, const float* bias,
                            c10::BFloat16* out, int64_t ldo);

}  // namespace tfkernels::cpu::bf16dot
