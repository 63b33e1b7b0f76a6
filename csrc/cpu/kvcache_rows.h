// The decode loops of the CPU kvcache attention: few query rows (the G heads of one
// kv head times a few positions) against a tile of cache rows given as row pointers
// (dense or paged alike). Each key or value row is loaded (and widened from 16 bits)
// once and used by every query row while it sits in L1, so the cache is streamed
// once per kv head. A BLAS GEMM of so few rows spends its time packing the tile
// instead. Defined in kvcache_rows.cpp, cloned per ISA.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace tfkernels::cpu::kvcache {

// The most query rows the row loops take; more go through GEMMs (kvcache attention()).
constexpr int64_t kRowLoopMaxRows = 16;

// S[r * lds + j] = dot(Q[r * D .. + D], K[j]) for r < M, j < n. D <= 256.
void qk_rows(const float* Q, int64_t M, int64_t D, const float* const* K, int64_t n, float* S, int64_t lds);
void qk_rows(const float* Q, int64_t M, int64_t D, const c10::BFloat16* const* K, int64_t n, float* S, int64_t lds);
void qk_rows(const float* Q, int64_t M, int64_t D, const c10::Half* const* K, int64_t n, float* S, int64_t lds);
void qk_rows(const double* Q, int64_t M, int64_t D, const double* const* K, int64_t n, double* S, int64_t lds);

// acc[r * D .. + D] += P[r * lds + j] * V[j] for the keys lo[r] <= j < hi[r] of row r
// (hidden keys are skipped, so their values never reach the row, not even as 0 x Inf).
void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, const float* const* V, int64_t D, const int64_t* lo,
             const int64_t* hi, float* acc);
void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, const c10::BFloat16* const* V, int64_t D,
             const int64_t* lo, const int64_t* hi, float* acc);
void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, const c10::Half* const* V, int64_t D,
             const int64_t* lo, const int64_t* hi, float* acc);
void pv_rows(const double* P, int64_t lds, int64_t M, int64_t n, const double* const* V, int64_t D,
             const int64_t* lo, const int64_t* hi, double* acc);

}  // namespace tfkernels::cpu::kvcache
