// AVX-512 fp32 tile GEMMs (f32_dot.h). Compiled for AVX-512 through target
// attributes, so the rest of the library keeps its baseline ISA; the entry points
// run only after available() said the CPU has it.
#include "cpu/f32_dot.h"

#include "cpu/cpu_caps.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TFK_HAVE_F32_DOT 1
#define TFK_AVX512 __attribute__((target("avx512f")))
#define TFK_TILE_TARGET TFK_AVX512
#include "cpu/avx512_tile_gemm.h"
#endif

namespace tfkernels::cpu::f32dot {
namespace {

// Panel shape of gemm_packed: 128 steps x 64 columns = 32 KiB, in L2 with the
// block of A it meets; 64 columns = the micro-kernel's width. Each panel's sums are
// added to C, so a long reduction is summed in blocks of 128: with 256, fused_mlp's
// fp32 grad_x came out at 2.45x the error of an fp32 reference (the tests allow 2x);
// at 128 its worst of 24 seeds was 1.28x (MKL's: 1.28x).
constexpr int64_t kPanelSteps = 128;
constexpr int64_t kPanelCols = PackedB::kCols;

#ifdef TFK_HAVE_F32_DOT

// One reduction step of the tile loop: A[i][p] broadcast, times a row of B, added.
struct F32 {
  using A = float;
  using B = float;
  static TFK_AVX512 __m512i broadcast(const A* a) { return _mm512_castps_si512(_mm512_set1_ps(*a)); }
  static TFK_AVX512 __m512 step(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
};

// In-register transpose of 16 rows of 16 floats: r[i] lane j <- r[j] lane i. Three
// rounds of interleaving (single floats, pairs, 128-bit lanes twice).
TFK_AVX512 inline void transpose16(__m512 r[16]) {
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

inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(count, 0, 16)) - 1);
}

// Blocks of 16 source rows x 16 columns, loaded under masks at the edges (missing
// rows read as zero, which fills dst's columns n .. packed_ld(n)), transposed, stored.
TFK_AVX512 void pack_transposed_avx512(const float* src, int64_t ld, int64_t n, int64_t cols, float* dst,
                                       int64_t ldp) {
  for (int64_t j = 0; j < n; j += 16) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 lanes = first_lanes(cols - c);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = j + i < n ? _mm512_maskz_loadu_ps(lanes, src + (j + i) * ld + c) : _mm512_setzero_ps();
      }
      transpose16(r);
      const int64_t out_rows = std::min<int64_t>(16, cols - c);
      for (int64_t i = 0; i < out_rows; ++i) _mm512_storeu_ps(dst + (c + i) * ldp + j, r[i]);
    }
  }
}

// panel[p][j] = op(B)[k0 + p][c0 + j] for p < steps, j < cols; columns cols .. 64 zero.
TFK_AVX512 void pack_panel(bool trans_b, const float* b, int64_t ldb, int64_t k0, int64_t c0, int64_t steps,
                           int64_t cols, float* panel) {
  if (trans_b) {  // op(B)[p][j] = b[j][p]: rows c0.. of b, transposed
    pack_transposed_avx512(b + c0 * ldb + k0, ldb, cols, steps, panel, kPanelCols);
    return;
  }
  for (int64_t p = 0; p < steps; ++p) {
    const float* src = b + (k0 + p) * ldb + c0;
    float* dst = panel + p * kPanelCols;
    for (int64_t j = 0; j < kPanelCols; j += 16) {
      _mm512_storeu_ps(dst + j, _mm512_maskz_loadu_ps(first_lanes(cols - j), src + j));
    }
  }
}

TFK_AVX512 void gemm_packed_avx512(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                                   const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                                   bool accumulate) {
  thread_local std::vector<float> panel(kPanelSteps * kPanelCols);
  const int64_t a_row = trans_a ? 1 : lda, a_step = trans_a ? lda : 1;
  for (int64_t c0 = 0; c0 < n; c0 += kPanelCols) {
    const int64_t cols = std::min(kPanelCols, n - c0);
    for (int64_t k0 = 0; k0 < k; k0 += kPanelSteps) {
      const int64_t steps = std::min(kPanelSteps, k - k0);
      pack_panel(trans_b, b, ldb, k0, c0, steps, cols, panel.data());
      tile_gemm::gemm<F32>(m, cols, steps, a + k0 * a_step, a_row, a_step, panel.data(), kPanelCols, alpha, c + c0,
                           ldc, accumulate || k0 > 0);
    }
  }
}

TFK_AVX512 void pack_b_avx512(bool trans_b, const float* b, int64_t ldb, PackedB& out) {
  const int64_t panels = (out.n() + kPanelCols - 1) / kPanelCols;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t c0 = panel * kPanelCols;
      pack_panel(trans_b, b, ldb, 0, c0, out.k(), std::min(kPanelCols, out.n() - c0), out.panel(panel));
    }
  });
}

TFK_AVX512 void gemm_prepacked_avx512(bool trans_a, int64_t m, int64_t cols, int64_t depth, float alpha,
                                      const float* a, int64_t lda, const PackedB& b, int64_t k0, int64_t c0, float* c,
                                      int64_t ldc, bool accumulate) {
  const int64_t a_row = trans_a ? 1 : lda, a_step = trans_a ? lda : 1;
  tile_gemm::gemm_panels<F32>(m, cols, depth, a, a_row, a_step, b.panel(0), b.k() * kPanelCols, k0, c0, kPanelSteps,
                              tile_gemm::StoreF32{c, ldc, alpha, accumulate});
}

#endif  // TFK_HAVE_F32_DOT

}  // namespace

bool available() {
#ifdef TFK_HAVE_F32_DOT
  return !switched_off("TFKERNELS_CPU_F32_DOT") && cpu_has("avx512_f");
#else
  return false;
#endif
}

void pack_transposed(const float* src, int64_t ld, int64_t n, int64_t cols, float* dst, int64_t ldp) {
  require_cpu("avx512_f", "f32dot::pack_transposed");
#ifdef TFK_HAVE_F32_DOT
  pack_transposed_avx512(src, ld, n, cols, dst, ldp);
#endif
}

void gemm(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t a_row, int64_t a_step, const float* b,
          int64_t ldb, float alpha, float* c, int64_t ldc, bool accumulate) {
  require_cpu("avx512_f", "f32dot::gemm");
#ifdef TFK_HAVE_F32_DOT
  tile_gemm::gemm<F32>(m, cols, depth, a, a_row, a_step, b, ldb, alpha, c, ldc, accumulate);
#endif
}

void gemm_packed(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  require_cpu("avx512_f", "f32dot::gemm_packed");
#ifdef TFK_HAVE_F32_DOT
  gemm_packed_avx512(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
#endif
}

// PackedB storage comes from warm_buffers.h: packing a 16 MiB weight into fresh
// memory cost as much as the repacking it saves (4096 page faults: fused_mlp's fp32
// forward ran 6-13% slower than with per-call panels on the 2-core Zen 4 VM).
PackedB::PackedB(int64_t k, int64_t n)
    : block_(warm::take(static_cast<size_t>((n + kPanelCols - 1) / kPanelCols * k * kPanelCols) * sizeof(float))),
      k_(k),
      n_(n) {}

PackedB::PackedB(PackedB&& other) noexcept
    : block_(std::exchange(other.block_, warm::Block{})), k_(other.k_), n_(other.n_) {}

PackedB& PackedB::operator=(PackedB&& other) noexcept {
  if (this != &other) {
    warm::give_back(std::exchange(block_, std::exchange(other.block_, warm::Block{})));
    k_ = other.k_;
    n_ = other.n_;
  }
  return *this;
}

PackedB::~PackedB() { warm::give_back(block_); }

PackedB pack_b(bool trans_b, const float* b, int64_t ldb, int64_t k, int64_t n) {
  require_cpu("avx512_f", "f32dot::pack_b");
  PackedB out(k, n);
#ifdef TFK_HAVE_F32_DOT
  pack_b_avx512(trans_b, b, ldb, out);
#endif
  return out;
}

void gemm_prepacked(bool trans_a, int64_t m, int64_t cols, int64_t depth, float alpha, const float* a, int64_t lda,
                    const PackedB& b, int64_t k0, int64_t c0, float* c, int64_t ldc, bool accumulate) {
  require_cpu("avx512_f", "f32dot::gemm_prepacked");
  TORCH_CHECK(k0 >= 0 && depth >= 0 && k0 + depth <= b.k() && c0 >= 0 && cols >= 0 && c0 + cols <= b.n(),
              "f32dot::gemm_prepacked: steps [", k0, ", ", k0 + depth, ") x columns [", c0, ", ", c0 + cols,
              ") outside the packed ", b.k(), " x ", b.n());
#ifdef TFK_HAVE_F32_DOT
  gemm_prepacked_avx512(trans_a, m, cols, depth, alpha, a, lda, b, k0, c0, c, ldc, accumulate);
#endif
}

}  // namespace tfkernels::cpu::f32dot
