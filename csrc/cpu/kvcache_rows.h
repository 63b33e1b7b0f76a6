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

// Rows of one kv head are Hkv * D elements apart in a [B, S, Hkv, D] cache (4 KiB for
// Hkv = 8, D = 128 in fp32): every row is on its own page, where the hardware
// prefetchers stop, so the loops ask for row j + kAhead themselves, reaching past the
// tile: the callers pass `known` >= n row pointers, the rows past n (those the caller's
// next loop starts on) only prefetched.
// (Measured, one thread, B=1 Hkv=8 D=128 S=4096 fp32: 2.6 GB/s without, 6.0 GB/s with
// kAhead = 16; the same bytes as one contiguous head ran at 8.4 GB/s.)
constexpr int64_t kAhead = 16;

template <typename In>
__attribute__((always_inline)) inline void prefetch_row(const In* const* rows, int64_t j, int64_t known, int64_t D) {
  if (j >= known) return;
  const char* p = reinterpret_cast<const char*>(rows[j]);
  // Into L2 (prefetcht1), not L1: an L1 prefetch holds one of the core's few L1 miss
  // buffers until its line arrives, so kAhead rows of them (128 lines at fp32 D128)
  // crowded out each other and the loops' own loads. B H32 Hkv8 S4096 D128 decode on 2
  // Zen 4 cores, medians of alternating processes: fp32 B8 (cache in memory)
  // 17.4 -> 24.6 GB/s, B1 (in L3) 23.4 -> 35.1; bf16 B8 13.1 -> 18.5.
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(In)); off += 64) __builtin_prefetch(p + off, 0, 2);
}

// S[r * lds + j] = dot(Q[r * D .. + D], K[j]) for r < M, j < n. D <= 256. K has `known` >= n entries.
void qk_rows(const float* Q, int64_t M, int64_t D, const float* const* K, int64_t n, int64_t known,
             float* S, int64_t lds);
void qk_rows(const float* Q, int64_t M, int64_t D, const c10::BFloat16* const* K, int64_t n, int64_t known,
             float* S, int64_t lds);
void qk_rows(const float* Q, int64_t M, int64_t D, const c10::Half* const* K, int64_t n, int64_t known,
             float* S, int64_t lds);
void qk_rows(const double* Q, int64_t M, int64_t D, const double* const* K, int64_t n, int64_t known,
             double* S, int64_t lds);

// acc[r * D .. + D] += P[r * lds + j] * V[j] for the keys lo[r] <= j < hi[r] of row r
// (hidden keys are skipped, so their values never reach the row, not even as 0 x Inf).
// V has `known` >= n entries.
void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, int64_t known, const float* const* V,
             int64_t D, const int64_t* lo, const int64_t* hi, float* acc);
void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, int64_t known, const c10::BFloat16* const* V,
             int64_t D, const int64_t* lo, const int64_t* hi, float* acc);
void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, int64_t known, const c10::Half* const* V,
             int64_t D, const int64_t* lo, const int64_t* hi, float* acc);
void pv_rows(const double* P, int64_t lds, int64_t M, int64_t n, int64_t known, const double* const* V,
             int64_t D, const int64_t* lo, const int64_t* hi, double* acc);

}  // namespace tfkernels::cpu::kvcache
