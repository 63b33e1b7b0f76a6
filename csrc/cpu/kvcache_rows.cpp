// The decode loops of kvcache_rows.h. The bodies are inline templates; each public
// overload is a TFK_MULTIVERSION function, so the compiler clones (and vectorises)
// the inlined body once per ISA.
#include "cpu/kvcache_rows.h"

#include <bit>
#include <cstring>

#include "cpu/multiversion.h"

namespace tfkernels::cpu::kvcache {
namespace {

constexpr int64_t kMaxD = 256;

// One cache row in the compute type: in place when it already is, else widened into buf.
inline const float* as_compute(const float* row, int64_t, float*) { return row; }
inline const double* as_compute(const double* row, int64_t, double*) { return row; }
__attribute__((always_inline)) inline const float* as_compute(const c10::BFloat16* row, int64_t D, float* buf) {
  D = D < kMaxD ? D : kMaxD;  // always true (D <= 256 is checked); tells the vectoriser the bound of buf
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    buf[d] = std::bit_cast<float>(static_cast<uint32_t>(bits[d]) << 16);  // bf16 is the top half of a float
  }
  return buf;
}
__attribute__((always_inline)) inline const float* as_compute(const c10::Half* row, int64_t D, float* buf) {
  for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}

// Generic (double, and the last keys of a float tile): a dot product's FMAs form one
// dependency chain, so four query rows at a time make four independent chains over the
// same key row.
template <typename T, typename In>
__attribute__((always_inline)) inline void qk_body(const T* Q, int64_t M, int64_t D, const In* const* K, int64_t n,
                                                   int64_t known, T* S, int64_t lds) {
  alignas(64) T buf[kMaxD];
  for (int64_t j = 0; j < n; ++j) {
    prefetch_row(K, j + kAhead, known, D);
    const T* k = as_compute(K[j], D, buf);
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) {
      const T *q0 = Q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t d = 0; d < D; ++d) {
        s0 += q0[d] * k[d];
        s1 += q1[d] * k[d];
        s2 += q2[d] * k[d];
        s3 += q3[d] * k[d];
      }
      S[r * lds + j] = s0;
      S[(r + 1) * lds + j] = s1;
      S[(r + 2) * lds + j] = s2;
      S[(r + 3) * lds + j] = s3;
    }
    for (; r < M; ++r) {
      const T* q = Q + r * D;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
      S[r * lds + j] = dot;
    }
  }
}

// float: eight keys per pass. Each query row keeps one 8-lane accumulator per key and
// reduces the eight together at the end (a shuffle tree whose lane t is key t's dot
// product), instead of one horizontal sum per (row, key), which cost as much as the FMAs.
using f32x8 = float __attribute__((vector_size(32)));
// The vector helpers are inlined into every ISA clone; no vector crosses a call boundary,
// so GCC's note that the default (SSE2) clone would pass them differently does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

__attribute__((always_inline)) inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Lane t of the result: the sum of the eight lanes of a[t].
__attribute__((always_inline)) inline f32x8 reduce8(const f32x8* a) {
  auto pairs = [](f32x8 x, f32x8 y) {
    return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  };
  auto quads = [](f32x8 x, f32x8 y) {
    return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  };
  const f32x8 lo = quads(pairs(a[0], a[1]), pairs(a[2], a[3]));  // lanes: a0 a1 a2 a3 (halves 0-3), then 4-7
  const f32x8 hi = quads(pairs(a[4], a[5]), pairs(a[6], a[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <typename In>
__attribute__((always_inline)) inline void qk_body_f32(const float* Q, int64_t M, int64_t D, const In* const* K,
                                                       int64_t n, int64_t known, float* S, int64_t lds) {
  alignas(64) float buf[8][kMaxD];
  const int64_t D8 = D / 8 * 8;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* k[8];
    for (int t = 0; t < 8; ++t) {
      prefetch_row(K, j + t + kAhead, known, D);
      k[t] = as_compute(K[j + t], D, buf[t]);
    }
    for (int64_t r = 0; r < M; ++r) {
      const float* q = Q + r * D;
      f32x8 acc[8] = {};
      for (int64_t d = 0; d < D8; d += 8) {
        const f32x8 qd = load8(q + d);
        for (int t = 0; t < 8; ++t) acc[t] += qd * load8(k[t] + d);
      }
      f32x8 dots = reduce8(acc);
      for (int64_t d = D8; d < D; ++d) {
        for (int t = 0; t < 8; ++t) dots[t] += q[d] * k[t][d];
      }
      std::memcpy(S + r * lds + j, &dots, sizeof dots);
    }
  }
  if (j < n) qk_body(Q, M, D, K + j, n - j, known - j, S + j, lds);
}

// Eight keys per pass over a row's accumulator: one load and store of acc per eight
// FMAs (the loop is bound by those loads and stores otherwise), summed as two chains of
// four. B H32 Hkv8 S4096 D128 decode on 2 Zen 4 cores, medians of alternating
// processes, against four keys a pass: B1 (cache in L3) fp32 33.7 -> 37.5 GB/s, bf16
// 19.8 -> 22.9; B8 (in memory) level.
constexpr int64_t kPvKeys = 8;

template <typename T, typename In>
__attribute__((always_inline)) inline void pv_body(const T* P, int64_t lds, int64_t M, int64_t n, int64_t known,
                                                   const In* const* V, int64_t D, const int64_t* lo,
                                                   const int64_t* hi, T* acc) {
  alignas(64) T buf[kPvKeys][kMaxD];
  for (int64_t j = 0; j < n; j += kPvKeys) {
    const int64_t nb = n - j < kPvKeys ? n - j : kPvKeys;
    const T* v[kPvKeys];
    for (int64_t t = 0; t < nb; ++t) {
      prefetch_row(V, j + t + kAhead, known, D);
      v[t] = as_compute(V[j + t], D, buf[t]);
    }
    for (int64_t r = 0; r < M; ++r) {
      const T* p = P + r * lds + j;
      T* a = acc + r * D;
      if (nb == kPvKeys && lo[r] <= j && j + kPvKeys <= hi[r]) {
        const T p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3], p4 = p[4], p5 = p[5], p6 = p[6], p7 = p[7];
        const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3], *v4 = v[4], *v5 = v[5], *v6 = v[6], *v7 = v[7];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          a[d] += (p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d]) +
                  (p4 * v4[d] + p5 * v5[d] + p6 * v6[d] + p7 * v7[d]);
        }
      } else {  // the edge of the row's band, or the tile's last keys
        for (int64_t t = 0; t < nb; ++t) {
          if (j + t < lo[r] || j + t >= hi[r]) continue;
          const T pt = p[t];
          const T* vt = v[t];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += pt * vt[d];
        }
      }
    }
  }
}

}  // namespace

TFK_MULTIVERSION void qk_rows(const float* Q, int64_t M, int64_t D, const float* const* K, int64_t n,
                              int64_t known, float* S, int64_t lds) {
  qk_body_f32(Q, M, D, K, n, known, S, lds);
}
TFK_MULTIVERSION void qk_rows(const float* Q, int64_t M, int64_t D, const c10::BFloat16* const* K, int64_t n,
                              int64_t known, float* S, int64_t lds) {
  qk_body_f32(Q, M, D, K, n, known, S, lds);
}
TFK_MULTIVERSION void qk_rows(const float* Q, int64_t M, int64_t D, const c10::Half* const* K, int64_t n,
                              int64_t known, float* S, int64_t lds) {
  qk_body_f32(Q, M, D, K, n, known, S, lds);
}
TFK_MULTIVERSION void qk_rows(const double* Q, int64_t M, int64_t D, const double* const* K, int64_t n,
                              int64_t known, double* S, int64_t lds) {
  qk_body(Q, M, D, K, n, known, S, lds);
}

TFK_MULTIVERSION void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, int64_t known,
                              const float* const* V, int64_t D, const int64_t* lo, const int64_t* hi, float* acc) {
  pv_body(P, lds, M, n, known, V, D, lo, hi, acc);
}
TFK_MULTIVERSION void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, int64_t known,
                              const c10::BFloat16* const* V, int64_t D, const int64_t* lo, const int64_t* hi,
                              float* acc) {
  pv_body(P, lds, M, n, known, V, D, lo, hi, acc);
}
TFK_MULTIVERSION void pv_rows(const float* P, int64_t lds, int64_t M, int64_t n, int64_t known,
                              const c10::Half* const* V, int64_t D, const int64_t* lo, const int64_t* hi, float* acc) {
  pv_body(P, lds, M, n, known, V, D, lo, hi, acc);
}
TFK_MULTIVERSION void pv_rows(const double* P, int64_t lds, int64_t M, int64_t n, int64_t known,
                              const double* const* V, int64_t D, const int64_t* lo, const int64_t* hi, double* acc) {
  pv_body(P, lds, M, n, known, V, D, lo, hi, acc);
}

}  // namespace tfkernels::cpu::kvcache
