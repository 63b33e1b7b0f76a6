// AVX512-BF16 tile GEMMs (bf16_dot.h). The vector code is compiled for AVX512-BF16
// through target attributes, so the rest of the library keeps its baseline ISA and
// these functions run only after available() said the CPU has the instruction.
#include "cpu/bf16_dot.h"

#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include "cpu/amx_dot.h"
#include "cpu/cpu_caps.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TFK_HAVE_BF16_DOT 1
#define TFK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define TFK_TILE_TARGET TFK_AVX512_BF16
#include "cpu/tile_gemm.h"
#endif

namespace tfkernels::cpu::bf16dot {
namespace {

#ifdef TFK_HAVE_BF16_DOT

// One reduction step of the tile loop (tile_gemm.h): a word of two bf16
// elements of A, broadcast, dotted with a packed word of B per lane.
struct Bf16Pairs {
  using Isa = tile_isa::Avx512;
  using A = c10::BFloat16;
  using B = uint32_t;
  static TFK_AVX512_BF16 __m512i broadcast(const A* a) {
    uint32_t word;
    std::memcpy(&word, a, sizeof(word));
    return _mm512_set1_epi32(static_cast<int>(word));
  }
  static TFK_AVX512_BF16 __m512 step(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};

// A tile's sums (+ bias) rounded to bf16 (nearest even, NaN kept, subnormals kept:
// c10's rounding, not vcvtneps2bf16's, which flushes them) into a row-major bf16 C.
struct StoreBf16 {
  static constexpr bool kAccumulates = false;
  uint16_t* c;
  int64_t ldc;
  const float* bias;  // per column, or null
  StoreBf16 at(int64_t row, int64_t col) const { return {c + row * ldc + col, ldc, bias ? bias + col : nullptr}; }
  template <bool kWhole>  // masked stores cost nothing extra on AVX-512
  TFK_AVX512_BF16 void store(int i, int z, __m512 sum, __mmask16 lanes) const {
    if (bias != nullptr) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes, bias + 16 * z));
    const __m512i bits = _mm512_castps_si512(sum);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(sum, sum, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(c + i * ldc + 16 * z, lanes, _mm512_cvtepi32_epi16(rounded));
  }
};

// 16-bit lane 2c of the result is lane c of x, lane 2c + 1 is lane 16 + c: two rows
// of 16 values (x's halves) interleaved into 16 words of pairs.
TFK_AVX512_BF16 inline __m512i interleave_halves(__m512i x) {
  alignas(64) static const int16_t index[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(index), x);
}

inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(count, 0, 16)) - 1);
}

TFK_AVX512_BF16 bool pack_row_pairs_avx512_bf16(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t cols,
                                                uint32_t* dst, int64_t ldp) {
  const __m512i exponent = _mm512_set1_epi16(0x7F80);
  __mmask32 non_finite = 0;
  for (int64_t p = 0; 2 * p < n; ++p) {
    const auto* r0 = reinterpret_cast<const uint16_t*>(src + 2 * p * ld);
    const auto* r1 = 2 * p + 1 < n ? r0 + ld : nullptr;
    for (int64_t c = 0; c < ldp; c += 16) {
      const __mmask16 lanes = first_lanes(cols - c);
      const __m256i lo = _mm256_maskz_loadu_epi16(lanes, r0 + c);
      const __m256i hi = r1 != nullptr ? _mm256_maskz_loadu_epi16(lanes, r1 + c) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_zextsi256_si512(lo), hi, 1);
      non_finite |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(both, exponent), exponent);
      _mm512_storeu_si512(dst + p * ldp + c, interleave_halves(both));
    }
  }
  return non_finite == 0;
}

TFK_AVX512_BF16 void round_row_pairs_avx512_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols,
                                                 uint32_t* dst, int64_t ldp) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const float* r0 = src + 2 * p * lds;
    const float* r1 = 2 * p + 1 < rows ? r0 + lds : nullptr;
    for (int64_t c = 0; c < ldp; c += 16) {
      const __mmask16 lanes = first_lanes(cols - c);
      const __m512 lo = _mm512_maskz_loadu_ps(lanes, r0 + c);
      const __m512 hi = r1 != nullptr ? _mm512_maskz_loadu_ps(lanes, r1 + c) : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + p * ldp + c, interleave_halves((__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

TFK_AVX512_BF16 void round_rows_avx512_bf16(const float* src, int64_t lds, int64_t rows, int64_t n,
                                            c10::BFloat16* dst, int64_t ldd) {
  const int64_t padded = n + (n & 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    auto* d = reinterpret_cast<uint16_t*>(dst + r * ldd);
    for (int64_t j = 0; j < padded; j += 16) {
      const int64_t width = std::min<int64_t>(16, padded - j);
      const int64_t valid = std::clamp<int64_t>(n - j, 0, 16);
      const __m512 x = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << valid) - 1), s + j);
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(x);
      _mm256_mask_storeu_epi16(d + j, static_cast<__mmask16>((1u << width) - 1), y);
    }
  }
}

// lo[i] and hi[i] = the low and high 16 bits of words[i], for i < n.
TFK_AVX512_BF16 void split_words_avx512_bf16(const uint32_t* words, int64_t n, uint16_t* lo, uint16_t* hi) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    const __m512i w = _mm512_maskz_loadu_epi32(lanes, words + i);
    _mm256_mask_storeu_epi16(lo + i, lanes, _mm512_cvtepi32_epi16(w));
    _mm256_mask_storeu_epi16(hi + i, lanes, _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
  }
}

TFK_AVX512_BF16 void scale_round_row_avx512_bf16(const float* src, int64_t n, float scale, c10::BFloat16* dst) {
  const __m512 a = _mm512_set1_ps(scale);
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, src + j), a);
    _mm256_mask_storeu_epi16(d + j, lanes, (__m256i)_mm512_cvtneps_pbh(x));
  }
}

// 2^(s c - m) for the lanes of s, added to total; returns the values (0 in lanes off).
TFK_AVX512_BF16 inline __m512 exp2_lanes(const float* s, __m512 c, __m512 m, __mmask16 lanes, __m512& total) {
  const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, s), c, m);
  // 2^x = 2^f 2^floor(x), f = x - floor(x) in [0, 1) in one vreduceps; vscalefps
  // multiplies by 2^floor(x) itself, so floor(x) is never formed. No clamps: the
  // keep mask zeroes x < -126 (-inf included), scalef saturates, NaN stays NaN.
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  // vec_math.h's exp2_poly<4> moved from [-0.5, 0.5] to [0, 1): sqrt(2) p(f - 0.5),
  // the same 2.7e-6 relative error.
  __m512 poly = _mm512_set1_ps(1.353416834e-2f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.201146327e-2f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.414427448e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.930038108e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.000002641e+0f));
  // poly * 2^floor(x) in one instruction; lanes below -126 (and past n) to 0.
  const __mmask16 keep = lanes & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 y = _mm512_maskz_scalef_ps(keep, poly, x);
  total = _mm512_add_ps(total, y);
  return y;
}

TFK_AVX512_BF16 float exp2_round_row_avx512_bf16(const float* s, int64_t n, float c, float m, c10::BFloat16* p) {
  const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(m);
  // Two sums, so that the additions do not chain from one vector to the next; whole
  // vectors without a mask (its computation cost as much as the exponential's adds).
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  int64_t j = 0;
  // 32 values per step, rounded by one vcvtne2ps2bf16 and written by one 64-byte store.
  for (; j + 32 <= n; j += 32) {
    const __m512 lo = exp2_lanes(s + j, vc, vm, 0xffff, even), hi = exp2_lanes(s + j + 16, vc, vm, 0xffff, odd);
    _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  for (; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 y = exp2_lanes(s + j, vc, vm, lanes, even);
    _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(p + j), lanes, (__m256i)_mm512_cvtneps_pbh(y));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
}

#endif  // TFK_HAVE_BF16_DOT

}  // namespace

bool available() {
#ifdef TFK_HAVE_BF16_DOT
  // Every CPU with AVX512-BF16 so far has AVX512-DQ too (vreduceps in the exponentials).
  return !switched_off("TFKERNELS_CPU_BF16_DOT") && cpu_has("avx512_bf16") && cpu_has("avx512_dq");
#else
  return false;
#endif
}

void pack_transposed(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t pairs, uint32_t* dst, int64_t ldp) {
  if (ld % 2 == 0 && cpu_has("avx512_f")) {
    // Rows of whole words: f32_dot's 32-bit transpose, 16 x 16 words in registers
    // (against the word-by-word loop below: the bf16 attention forward 7-14% faster,
    // forward+backward 3-5%, at S 512 and 2048 on the 2-core Zen 4).
    f32dot::pack_transposed(reinterpret_cast<const float*>(src), ld / 2, n, pairs, reinterpret_cast<float*>(dst), ldp);
    const int64_t written = f32dot::packed_ld(n);
    for (int64_t p = 0; p < pairs; ++p) std::fill(dst + p * ldp + std::min(written, ldp), dst + (p + 1) * ldp, 0u);
    return;
  }
  for (int64_t p = 0; p < pairs; ++p) std::fill(dst + p * ldp + n, dst + (p + 1) * ldp, 0u);
  for (int64_t j = 0; j < n; ++j) {
    const c10::BFloat16* row = src + j * ld;
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t word;
      std::memcpy(&word, row + 2 * p, sizeof(word));
      dst[p * ldp + j] = word;
    }
  }
}

bool pack_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t cols, uint32_t* dst, int64_t ldp) {
  require_cpu("avx512_bf16", "bf16dot::pack_row_pairs");
#ifdef TFK_HAVE_BF16_DOT
  return pack_row_pairs_avx512_bf16(src, ld, n, cols, dst, ldp);
#else
  return false;
#endif
}

float exp2_round_row(const float* s, int64_t n, float c, float m, c10::BFloat16* p) {
#ifdef TFK_HAVE_BF16_DOT
  return exp2_round_row_avx512_bf16(s, n, c, m, p);
#else
  return 0.0f;
#endif
}

void round_row_pairs(const float* src, int64_t lds, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldp) {
  require_cpu("avx512_bf16", "bf16dot::round_row_pairs");
#ifdef TFK_HAVE_BF16_DOT
  round_row_pairs_avx512_bf16(src, lds, rows, cols, dst, ldp);
#endif
}

void round_rows(const float* src, int64_t lds, int64_t rows, int64_t n, c10::BFloat16* dst, int64_t ldd) {
  require_cpu("avx512_bf16", "bf16dot::round_rows");
#ifdef TFK_HAVE_BF16_DOT
  round_rows_avx512_bf16(src, lds, rows, n, dst, ldd);
#endif
}

void transpose16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd,
                 uint32_t* words) {
  require_cpu("avx512_bf16", "bf16dot::transpose16");
  TORCH_CHECK(cols % 2 == 0 && ld % 2 == 0, "bf16dot::transpose16: cols ", cols, " and ld ", ld, " must be even");
#ifdef TFK_HAVE_BF16_DOT
  const int64_t ldw = f32dot::packed_ld(rows);
  // Word p of row r holds columns 2p (low half, little-endian) and 2p + 1.
  f32dot::pack_transposed(reinterpret_cast<const float*>(src), ld / 2, rows, cols / 2, reinterpret_cast<float*>(words),
                          ldw);
  for (int64_t p = 0; p < cols / 2; ++p) {
    split_words_avx512_bf16(words + p * ldw, rows, dst + 2 * p * ldd, dst + (2 * p + 1) * ldd);
  }
#endif
}

void scale_round_row(const float* src, int64_t n, float scale, c10::BFloat16* dst) {
#ifdef TFK_HAVE_BF16_DOT
  scale_round_row_avx512_bf16(src, n, scale, dst);
#endif
}

void gemm(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
          const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  require_cpu("avx512_bf16", "bf16dot::gemm");
  // Row-major A on the matrix unit where the CPU has one (B1 H8 bf16 attention forward
  // on 2 Xeon cores with AMX: see amx_dot.h).
  if (a_pair == 2 && amx::available()) return amx::gemm(m, cols, pairs, a, a_row, b, ldb, c, ldc, accumulate);
#ifdef TFK_HAVE_BF16_DOT
  tile_gemm::gemm<Bf16Pairs>(m, cols, pairs, a, a_row, a_pair, b, ldb, 1.0f, c, ldc, accumulate);
#endif
}

bool prepacked_applies(int64_t k) { return k > 0 && k % 2 == 0 && available() && !cpu_has("amx_bf16"); }

f32dot::PackedB pack_weight_transposed(const c10::BFloat16* w, int64_t ldw, int64_t k, int64_t n) {
  require_cpu("avx512_bf16", "bf16dot::pack_weight_transposed");
  TORCH_CHECK(k % 2 == 0 && ldw % 2 == 0, "bf16dot::pack_weight_transposed: k and ldw must be even, got ", k, ", ",
              ldw);
  // W^T's pair p of column c is the 32-bit word p of W's row c: a word transpose.
  return f32dot::pack_b(true, reinterpret_cast<const float*>(w), ldw / 2, k / 2, n);
}

f32dot::PackedB pack_rows(const c10::BFloat16* b, int64_t ldb, int64_t k, int64_t n) {
  require_cpu("avx512_bf16", "bf16dot::pack_rows");
  f32dot::PackedB out((k + 1) / 2, n);
#ifdef TFK_HAVE_BF16_DOT
  constexpr int64_t kCols = f32dot::PackedB::kCols;
  at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t c0 = panel * kCols;
      pack_row_pairs_avx512_bf16(b + c0, ldb, k, std::min(kCols, n - c0), reinterpret_cast<uint32_t*>(out.panel(panel)),
                                 kCols);
    }
  });
#endif
  return out;
}

void gemm_prepacked(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
                    const f32dot::PackedB& b, int64_t p0, int64_t c0, float* c, int64_t ldc, bool accumulate) {
  require_cpu("avx512_bf16", "bf16dot::gemm_prepacked");
  TORCH_CHECK(p0 >= 0 && pairs >= 0 && p0 + pairs <= b.k() && c0 >= 0 && cols >= 0 && c0 + cols <= b.n(),
              "bf16dot::gemm_prepacked: pairs [", p0, ", ", p0 + pairs, ") x columns [", c0, ", ", c0 + cols,
              ") outside the packed ", b.k(), " x ", b.n());
#ifdef TFK_HAVE_BF16_DOT
  // Pairs summed in registers before each add to C. fused_qkv's bf16 forward (K 1024 =
  // 512 pairs, 2-core Zen 4, alternating calls, 25 each) ran 3-4% faster with 256, 512
  // or 2048 than with 128 (the C tile's loads and stores); fp32 sums of 1024 bf16
  // products stay far below the output's bf16 rounding.
  constexpr int64_t kBlockPairs = 512;
  tile_gemm::gemm_panels<Bf16Pairs>(m, cols, pairs, a, a_row, a_pair, reinterpret_cast<const uint32_t*>(b.panel(0)),
                                    b.k() * f32dot::PackedB::kCols, p0, c0, kBlockPairs,
                                    tile_gemm::StoreF32<tile_isa::Avx512>{c, ldc, 1.0f, accumulate});
#endif
}

void gemm_prepacked_rounded(int64_t m, int64_t cols, int64_t pairs, const c10::BFloat16* a, int64_t a_row,
                            int64_t a_pair, const f32dot::PackedB& b, int64_t p0, int64_t c0, const float* bias,
                            c10::BFloat16* out, int64_t ldo) {
  require_cpu("avx512_bf16", "bf16dot::gemm_prepacked_rounded");
  TORCH_CHECK(p0 >= 0 && pairs > 0 && p0 + pairs <= b.k() && c0 >= 0 && cols >= 0 && c0 + cols <= b.n(),
              "bf16dot::gemm_prepacked_rounded: pairs [", p0, ", ", p0 + pairs, ") x columns [", c0, ", ", c0 + cols,
              ") outside the packed ", b.k(), " x ", b.n(), " (or no pairs)");
#ifdef TFK_HAVE_BF16_DOT
  tile_gemm::gemm_panels<Bf16Pairs>(m, cols, pairs, a, a_row, a_pair, reinterpret_cast<const uint32_t*>(b.panel(0)),
                                    b.k() * f32dot::PackedB::kCols, p0, c0, pairs,
                                    StoreBf16{reinterpret_cast<uint16_t*>(out), ldo, bias});
#endif
}

}  // namespace tfkernels::cpu::bf16dot
