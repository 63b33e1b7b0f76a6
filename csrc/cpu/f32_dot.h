// fp32 GEMMs on our own register-tiled kernels (AVX-512, or AVX2 with FMA3): tile
// products for the CPU flash attention (forward and backward), in place of one sgemm
// call per tile product, and whole GEMMs with packed panels for the fused GEMM ops. A
// library GEMM packs both operands on every call; here K and V are transposed once
// per key tile (`pack_transposed`) and every other operand (Q, dO, P, dS, V, K) is
// read in place, P^T and dS^T through strides. The register tiling is shared with
// bf16_dot (tile_gemm.h); the kernels per instruction set are f32_dot_kernels.h's.
#pragma once

#include <cstdint>

#include "cpu/warm_buffers.h"

namespace tfkernels::cpu::f32dot {

// Whether the CPU has AVX-512 (F) or AVX2 with FMA3 and TFKERNELS_CPU_F32_DOT is not
// 0 (read on every call: tests force the sgemm path with it, and with "avx2" the AVX2
// kernels on a CPU that has AVX-512 as well). The entry points below run on any CPU
// with either (bf16_dot packs with them whatever the switch says).
bool available();

// Whether whole GEMMs (gemm_packed, and pack_b with gemm_prepacked: the fused ops'
// products, mm_out_cpu) should run here rather than on MKL: with the AVX-512 kernels
// (~85% of the FMA peak against sgemm's ~62% on the 2-core Zen 4 VM), not the AVX2
// ones. On the 2-core Zen 3 VM sgemm's whole GEMMs are ahead of them (88 against 80
// GFLOP/s a core at 256 x 1024 x 512), and far ahead where op(A) is transposed with a
// long leading dim (a weight gradient: each step's A elements sit a row of 16 KiB
// apart, one L1 set and one page per step; fused_qkv forward+backward 0.82x of the
// same op on sgemm). The attention's tile products gain from them (available()).
bool whole_gemms_available();

// Columns per packed row for `cols` columns (a multiple of 16: whole vectors).
inline int64_t packed_ld(int64_t cols) { return (cols + 15) / 16 * 16; }

// A row stride of at least `ld` floats for a packed operand that the tile loop reads
// down its columns (K^T, V^T: one row per reduction step): an odd number of 64-byte
// lines, so that consecutive rows fall in different sets of the L1. At a multiple of
// 4 KiB they all share one set (of 8 ways on Zen 3) and evict each other.
inline int64_t spread_ld(int64_t ld) { return ((ld + 15) / 16 | 1) * 16; }

// Whether rows `ld` floats apart crowd into at most 8 of the L1's 64 sets (a stride
// that is a multiple of 512 bytes: D = 128 rows, or [B,S,H,D] inputs with H D a
// multiple of 128), so that an operand the tile loop reads down its rows evicts
// itself. P V on Zen 3, one core, 256 x 128 x 512: 87-90 GFLOP/s with V rows 512 B
// apart, 64-68 at 2-4 KiB, 94-96 at spread_ld.
inline bool crowds_l1_sets(int64_t ld) { return ld % 128 == 0; }

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

// op(B) of one product packed once for the many single-threaded calls that share it
// (the row blocks of a whole GEMM, the tiles of a fused op): gemm_packed packs the
// panels it needs on every call, which for a tile or row block of a 2048 x 1024 x
// 4096 product means all of B again (W transposed 16 times over in linear_gelu's
// forward). Panels of 64 columns x all k steps, [ceil(n / 64)][k][64].
// The panels' storage is kept between calls (warm_buffers.h).
class PackedB {
 public:
  static constexpr int64_t kCols = 64;  // columns per panel: the micro-kernel's width

  PackedB() = default;
  PackedB(int64_t k, int64_t n);  // storage for the panels, contents undefined
  PackedB(PackedB&& other) noexcept;
  PackedB& operator=(PackedB&& other) noexcept;
  ~PackedB();

  bool empty() const { return block_.data == nullptr; }
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  // Panel p (columns kCols p ..), from step 0: row i at panel(p) + kCols i.
  float* panel(int64_t p) const { return static_cast<float*>(block_.data) + p * k_ * kCols; }

 private:
  warm::Block block_;
  int64_t k_ = 0, n_ = 0;
};

// Packs op(B) (k x n; B^T of a stored n x k matrix when trans_b), in parallel over
// panels (at::parallel_for).
PackedB pack_b(bool trans_b, const float* b, int64_t ldb, int64_t k, int64_t n);

// C[m][cols] = alpha op(A) op(B)[k0 : k0 + depth, c0 : c0 + cols] (+ C if accumulate)
// with op(B) from pack_b; op(A) is m x depth as gemm_packed reads it (its step 0
// meets op(B)'s step k0). Same panel sums as gemm_packed (blocks of 128 steps from
// k0), so results match it bit for bit. One thread.
void gemm_prepacked(bool trans_a, int64_t m, int64_t cols, int64_t depth, float alpha, const float* a, int64_t lda,
                    const PackedB& b, int64_t k0, int64_t c0, float* c, int64_t ldc, bool accumulate);

// C[i][c] = sum over p < depth of A[i][p] op(B)[p][c0 + c] for a row-major A (rows lda
// apart), over C, and row_max[i] = max over c < cols of C[i][c]: the attention
// forward's S = Q K^T from K^T packed once per call, the softmax's row max taken from
// the registers (a NaN in a row may or may not reach its max). Sums over all depth
// steps in one block (gemm_prepacked's blocks of 128 would store and reload them).
void gemm_row_max(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t lda, const PackedB& b, int64_t c0,
                  float* c, int64_t ldc, float* row_max);

}  // namespace tfkernels::cpu::f32dot
