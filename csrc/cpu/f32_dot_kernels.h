// f32_dot's kernels over one instruction set's vectors (tile_isa.h), compiled once
// per instruction set: include from a .cpp that defines TFK_TILE_TARGET (the target
// attribute) and names the result with Kernels<Isa>::backend().
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/f32_dot.h"
#include "cpu/f32_dot_backend.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec_math.h"

namespace tfkernels::cpu::f32dot {
namespace {

static_assert(PackedB::kCols == tile_gemm::kPanelCols, "PackedB's panels are the tile loop's");

// Panel shape of gemm_packed: 128 steps x 64 columns = 32 KiB, in L2 with the
// block of A it meets. Each panel's sums are added to C, so a long reduction is
// summed in blocks of 128: with 256, fused_mlp's fp32 grad_x came out at 2.45x the
// error of an fp32 reference (the tests allow 2x); at 128 its worst of 24 seeds was
// 1.28x (MKL's: 1.28x).
constexpr int64_t kPanelSteps = 128;
constexpr int64_t kPanelCols = PackedB::kCols;

// One reduction step of the tile loop: A[i][p] broadcast, times a row of B, added.
template <class IsaT>
struct F32 {
  using Isa = IsaT;
  using A = float;
  using B = float;
  static TFK_TILE_TARGET typename Isa::Bits broadcast(const A* a) { return Isa::as_bits(Isa::set1(*a)); }
  static TFK_TILE_TARGET typename Isa::Vec step(typename Isa::Vec acc, typename Isa::Bits a, typename Isa::Bits b) {
    return Isa::fmadd(Isa::as_vec(a), Isa::as_vec(b), acc);
  }
};

template <class Isa>
struct Kernels {
  static constexpr int64_t kLanes = Isa::kLanes;

  // Blocks of kLanes source rows x kLanes columns, loaded under masks at the edges
  // (missing rows read as zero, which fills dst's columns n .. packed_ld(n)),
  // transposed in registers, stored.
  static TFK_TILE_TARGET void pack_transposed(const float* src, int64_t ld, int64_t n, int64_t cols, float* dst,
                                              int64_t ldp) {
    for (int64_t j = 0; j < n; j += kLanes) {
      for (int64_t c = 0; c < cols; c += kLanes) {
        const auto lanes = Isa::first(cols - c);
        typename Isa::Vec r[kLanes];
        for (int i = 0; i < kLanes; ++i) {
          const float* row = src + (j + i) * ld + c;
          r[i] = j + i >= n ? Isa::zero() : cols - c >= kLanes ? Isa::load(row) : Isa::load(row, lanes);
        }
        Isa::transpose(r);
        const int64_t out_rows = std::min(kLanes, cols - c);
        for (int64_t i = 0; i < out_rows; ++i) Isa::store(dst + (c + i) * ldp + j, r[i]);
      }
    }
    // Vectors narrower than packed_ld's 16 columns leave its last ones to zero here.
    for (int64_t j = (n + kLanes - 1) / kLanes * kLanes; j < packed_ld(n); j += kLanes) {
      for (int64_t c = 0; c < cols; ++c) Isa::store(dst + c * ldp + j, Isa::zero());
    }
  }

  static TFK_TILE_TARGET void pack_panel(bool trans_b, const float* b, int64_t ldb, int64_t k0, int64_t c0,
                                         int64_t steps, int64_t cols, float* panel) {
    if (trans_b) {  // op(B)[p][j] = b[j][p]: rows c0.. of b, transposed
      pack_transposed(b + c0 * ldb + k0, ldb, cols, steps, panel, kPanelCols);
      return;
    }
    for (int64_t p = 0; p < steps; ++p) {
      const float* src = b + (k0 + p) * ldb + c0;
      float* dst = panel + p * kPanelCols;
      for (int64_t j = 0; j < kPanelCols; j += kLanes) {
        Isa::store(dst + j, cols - j >= kLanes ? Isa::load(src + j) : Isa::load(src + j, Isa::first(cols - j)));
      }
    }
  }

  static TFK_TILE_TARGET void gemm(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t a_row,
                                   int64_t a_step, const float* b, int64_t ldb, float alpha, float* c, int64_t ldc,
                                   bool accumulate) {
    tile_gemm::gemm<F32<Isa>>(m, cols, depth, a, a_row, a_step, b, ldb, alpha, c, ldc, accumulate);
  }

  static TFK_TILE_TARGET void gemm_row_max(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t lda,
                                           const float* panels, int64_t panel_stride, int64_t c0, float* c,
                                           int64_t ldc, float* row_max) {
    thread_local std::vector<float> lane_max;
    lane_max.assign(static_cast<size_t>(m * kLanes), -__builtin_inff());
    tile_gemm::gemm_panels<F32<Isa>>(m, cols, depth, a, lda, 1, panels, panel_stride, 0, c0, depth,
                                     tile_gemm::StoreF32LaneMax<Isa>{c, ldc, lane_max.data()});
    for (int64_t i = 0; i < m; ++i) row_max[i] = Isa::max_across(Isa::load(lane_max.data() + i * kLanes));
  }

  static TFK_TILE_TARGET void gemm_packed(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                                          const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                          int64_t ldc, bool accumulate) {
    thread_local std::vector<float> panel(kPanelSteps * kPanelCols);
    const int64_t a_row = trans_a ? 1 : lda, a_step = trans_a ? lda : 1;
    for (int64_t c0 = 0; c0 < n; c0 += kPanelCols) {
      const int64_t cols = std::min(kPanelCols, n - c0);
      for (int64_t k0 = 0; k0 < k; k0 += kPanelSteps) {
        const int64_t steps = std::min(kPanelSteps, k - k0);
        pack_panel(trans_b, b, ldb, k0, c0, steps, cols, panel.data());
        tile_gemm::gemm<F32<Isa>>(m, cols, steps, a + k0 * a_step, a_row, a_step, panel.data(), kPanelCols, alpha,
                                  c + c0, ldc, accumulate || k0 > 0);
      }
    }
  }

  static TFK_TILE_TARGET void gemm_prepacked(bool trans_a, int64_t m, int64_t cols, int64_t depth, float alpha,
                                             const float* a, int64_t lda, const float* panels, int64_t panel_stride,
                                             int64_t k0, int64_t c0, float* c, int64_t ldc, bool accumulate) {
    const int64_t a_row = trans_a ? 1 : lda, a_step = trans_a ? lda : 1;
    tile_gemm::gemm_panels<F32<Isa>>(m, cols, depth, a, a_row, a_step, panels, panel_stride, k0, c0, kPanelSteps,
                                     tile_gemm::StoreF32<Isa>{c, ldc, alpha, accumulate});
  }

  // vec_math.h's fast_exp2f, lane for lane and bit for bit: the clamps as min / max
  // (GCC vectorises the scalar loop's with compares and blends: 11.3 cycles a vector
  // of 8 on Zen 3 in exp2_scaled_sum's loop, 8.3 here).
  static TFK_TILE_TARGET typename Isa::Vec fast_exp2f(typename Isa::Vec x) {
    const auto xc = Isa::max(Isa::set1(-126.0f), Isa::min(Isa::set1(127.0f), x));
    const auto r = Isa::round_even(xc);
    const auto f = Isa::sub(xc, r);
    auto p = Isa::set1(kExp2Poly6[0]);
#pragma GCC unroll 6
    for (int i = 1; i < 7; ++i) p = Isa::fmadd(p, f, Isa::set1(kExp2Poly6[i]));
    return Isa::zero_where_below(Isa::mul(p, Isa::pow2_whole(r)), x, -126.0f);
  }

  // s[j] <- 2^(s[j] c - m), as flash_attention_softmax.cpp's loops; returns their sum
  // (when `sum`), added up lane-wise, then across the lanes.
  template <bool kSum>
  static TFK_TILE_TARGET float exp2_scaled_rows(float* s, int64_t n, float c, float m) {
    const auto vc = Isa::set1(c), vm = Isa::set1(m);
    auto total = Isa::zero();
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const auto p = fast_exp2f(Isa::fmsub(Isa::load(s + j), vc, vm));
      Isa::store(s + j, p);
      if constexpr (kSum) total = Isa::add(total, p);
    }
    if (j < n) {
      const auto lanes = Isa::first(n - j);
      const auto p = fast_exp2f(Isa::fmsub(Isa::load(s + j, lanes), vc, vm));
      Isa::store(s + j, lanes, p);
      if constexpr (kSum) total = Isa::add(total, Isa::keep(p, lanes));
    }
    return kSum ? Isa::sum(total) : 0.0f;
  }
  static TFK_TILE_TARGET float exp2_scaled_sum(float* s, int64_t n, float c, float m) {
    return exp2_scaled_rows<true>(s, n, c, m);
  }
  static TFK_TILE_TARGET void exp2_scaled(float* s, int64_t n, float c, float m) {
    exp2_scaled_rows<false>(s, n, c, m);
  }

  static Backend backend(const char* isa, bool whole_gemms) {
    return {isa,          whole_gemms,  &pack_transposed, &pack_panel,      &gemm,       &gemm_row_max,
            &gemm_packed, &gemm_prepacked, &exp2_scaled_sum, &exp2_scaled};
  }
};

}  // namespace
}  // namespace tfkernels::cpu::f32dot
