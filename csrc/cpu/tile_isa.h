// The vector registers the tile GEMMs (tile_gemm.h) and f32_dot's packing are
// written over, one struct per instruction set:
//   Avx512   16 fp32 lanes, lane masks in k registers; 32 zmm registers
//   Avx2     8 fp32 lanes with FMA3, lane masks as vectors; 16 ymm registers
// Each says how many vectors of columns a micro-tile row holds (kVectors: 6 rows x
// kVectors accumulators, plus kVectors B vectors and a broadcast, must fit in the
// register file) and whether a masked load costs what a plain one does (on AVX2 a
// vmaskmov load is slower, so the tile loop uses it only on a partial last vector).
// Every function is compiled for its own instruction set and inlines into callers
// compiled for it or a superset; callers run them only after checking the CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define TFK_HAVE_TILE_ISA 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define TFK_ISA_AVX512 __attribute__((target("avx512f"), always_inline)) inline
#define TFK_ISA_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

namespace tfkernels::cpu::tile_isa {

struct Avx512 {
  using Vec = __m512;
  using Bits = __m512i;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kVectors = 4;  // 24 accumulators + 4 B vectors + 1 broadcast of 32
  static constexpr bool kMaskedLoadsAreFree = true;
  // A block of columns' B (128 steps x 256 B for D = 128) already fills the L1: no
  // prefetch of the next one (see Avx2; not measured here).
  static constexpr bool kPrefetchNextColumns = false;

  static TFK_ISA_AVX512 Mask first(int64_t count) {
    return static_cast<Mask>((1u << std::clamp<int64_t>(count, 0, kLanes)) - 1);
  }
  static TFK_ISA_AVX512 Vec zero() { return _mm512_setzero_ps(); }
  static TFK_ISA_AVX512 Vec set1(float x) { return _mm512_set1_ps(x); }
  static TFK_ISA_AVX512 Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static TFK_ISA_AVX512 Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static TFK_ISA_AVX512 Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static TFK_ISA_AVX512 Vec load(const float* p, Mask lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
  static TFK_ISA_AVX512 void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static TFK_ISA_AVX512 void store(float* p, Mask lanes, Vec v) { _mm512_mask_storeu_ps(p, lanes, v); }
  static TFK_ISA_AVX512 Bits load_bits(const void* p) { return _mm512_loadu_si512(p); }
  static TFK_ISA_AVX512 Bits load_bits(const void* p, Mask lanes) { return _mm512_maskz_loadu_epi32(lanes, p); }
  static TFK_ISA_AVX512 Bits as_bits(Vec v) { return _mm512_castps_si512(v); }
  static TFK_ISA_AVX512 Vec as_vec(Bits b) { return _mm512_castsi512_ps(b); }

  // For the softmax's exponentials (f32_dot_kernels.h's fast_exp2f). min and max
  // return their second operand when either is NaN, so min(c, x) keeps a NaN x.
  static TFK_ISA_AVX512 Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static TFK_ISA_AVX512 Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static TFK_ISA_AVX512 Vec fmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }
  static TFK_ISA_AVX512 Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static TFK_ISA_AVX512 Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static TFK_ISA_AVX512 Vec round_even(Vec x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^r for whole r in [-126, 127], through the exponent bits.
  static TFK_ISA_AVX512 Vec pow2_whole(Vec r) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  // y, with 0 in the lanes where x < bound (NaN x keeps y).
  static TFK_ISA_AVX512 Vec zero_where_below(Vec y, Vec x, float bound) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(bound), _CMP_NLT_UQ), y);
  }
  static TFK_ISA_AVX512 Vec keep(Vec v, Mask lanes) { return _mm512_maskz_mov_ps(lanes, v); }
  static TFK_ISA_AVX512 float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  // v in `lanes`, `fill` in the others.
  static TFK_ISA_AVX512 Vec or_fill(Vec v, Mask lanes, float fill) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), lanes, v);
  }
  static TFK_ISA_AVX512 float max_across(Vec v) { return _mm512_reduce_max_ps(v); }

  // r[i] lane j <- r[j] lane i: three rounds of interleaving (single floats, pairs,
  // 128-bit lanes twice).
  static TFK_ISA_AVX512 void transpose(Vec r[kLanes]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      const auto d0 = _mm512_castps_pd(t[i]), d1 = _mm512_castps_pd(t[i + 1]);
      const auto d2 = _mm512_castps_pd(t[i + 2]), d3 = _mm512_castps_pd(t[i + 3]);
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(d0, d2));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d2));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(d1, d3));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(d1, d3));
    }
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
      t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
      t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
      r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
      r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
    }
  }
};

struct Avx2 {
  using Vec = __m256;
  using Bits = __m256i;
  using Mask = __m256i;  // lane i on when its 32 bits are all ones
  static constexpr int kLanes = 8;
  static constexpr int kVectors = 2;  // 12 accumulators + 2 B vectors + 1 broadcast of 16
  static constexpr bool kMaskedLoadsAreFree = false;
  // The first micro-tile of each block of columns prefetches the next block's B (one
  // 64-byte row segment per step) into the L1. The attention forward's K^T comes from
  // L3, one page per step; every first micro-tile waited on it: B1 H8 fp32 forward
  // 2.5-4% faster, forward + backward 1-2% (Zen 3, S512 and S2048, D64 and D128).
  static constexpr bool kPrefetchNextColumns = true;

  static TFK_ISA_AVX2 Mask first(int64_t count) {
    const auto n = static_cast<int>(std::clamp<int64_t>(count, 0, kLanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static TFK_ISA_AVX2 Vec zero() { return _mm256_setzero_ps(); }
  static TFK_ISA_AVX2 Vec set1(float x) { return _mm256_set1_ps(x); }
  static TFK_ISA_AVX2 Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static TFK_ISA_AVX2 Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static TFK_ISA_AVX2 Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static TFK_ISA_AVX2 Vec load(const float* p, Mask lanes) { return _mm256_maskload_ps(p, lanes); }
  static TFK_ISA_AVX2 void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static TFK_ISA_AVX2 void store(float* p, Mask lanes, Vec v) { _mm256_maskstore_ps(p, lanes, v); }
  static TFK_ISA_AVX2 Bits load_bits(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static TFK_ISA_AVX2 Bits load_bits(const void* p, Mask lanes) {
    return _mm256_maskload_epi32(static_cast<const int*>(p), lanes);
  }
  static TFK_ISA_AVX2 Bits as_bits(Vec v) { return _mm256_castps_si256(v); }
  static TFK_ISA_AVX2 Vec as_vec(Bits b) { return _mm256_castsi256_ps(b); }

  // As Avx512's (vminps / vmaxps have the same NaN rule).
  static TFK_ISA_AVX2 Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static TFK_ISA_AVX2 Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static TFK_ISA_AVX2 Vec fmsub(Vec a, Vec b, Vec c) { return _mm256_fmsub_ps(a, b, c); }
  static TFK_ISA_AVX2 Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static TFK_ISA_AVX2 Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static TFK_ISA_AVX2 Vec round_even(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static TFK_ISA_AVX2 Vec pow2_whole(Vec r) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static TFK_ISA_AVX2 Vec zero_where_below(Vec y, Vec x, float bound) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(bound), _CMP_LT_OQ), y);
  }
  static TFK_ISA_AVX2 Vec keep(Vec v, Mask lanes) { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes)); }
  static TFK_ISA_AVX2 Vec or_fill(Vec v, Mask lanes, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(lanes));
  }
  static TFK_ISA_AVX2 float max_across(Vec v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static TFK_ISA_AVX2 float sum(Vec v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }

  // r[i] lane j <- r[j] lane i: floats, then pairs interleaved within 128-bit
  // halves, then the halves exchanged.
  static TFK_ISA_AVX2 void transpose(Vec r[kLanes]) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
      t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; ++i) r[i] = t[i];
  }
};

}  // namespace tfkernels::cpu::tile_isa

#endif  // x86-64 with GCC or Clang
