// fp32 tile GEMMs (f32_dot.h): picks the kernels for the running CPU
// (f32_dot_backend.h) and checks the calls' arguments; the kernels themselves are in
// f32_dot_kernels.h, compiled per instruction set.
#include "cpu/f32_dot.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

#include "cpu/cpu_caps.h"
#include "cpu/f32_dot_backend.h"
#include "cpu/f32_exp.h"

namespace tfkernels::cpu::f32dot {
namespace {

const Backend* avx512_if_present() { return cpu_has("avx512_f") ? avx512_backend() : nullptr; }
const Backend* avx2_if_present() { return cpu_has("avx2") && cpu_has("fma3") ? avx2_backend() : nullptr; }

// The kernels this CPU runs best, whatever the switch says (bf16_dot's packing uses
// them even with the fp32 GEMMs switched to MKL); null on a CPU with neither.
const Backend* best_present() {
  static const Backend* const best = avx512_if_present() != nullptr ? avx512_if_present() : avx2_if_present();
  return best;
}

// What the switch asks for: TFKERNELS_CPU_F32_DOT=avx2 the AVX2 kernels on a CPU
// that also has AVX-512 (so its tests cover both), "0" none (MKL), otherwise the best.
const Backend* chosen() {
  if (switched_off("TFKERNELS_CPU_F32_DOT")) return nullptr;
  const char* value = std::getenv("TFKERNELS_CPU_F32_DOT");
  if (value != nullptr && std::string(value) == "avx2") return avx2_if_present();
  return best_present();
}

// The best kernels present, for entry points called per row (no switch to read).
const Backend& present(const char* function) {
  const Backend* backend = best_present();
  TORCH_CHECK(backend != nullptr, "tfkernels: f32dot::", function, " needs a CPU with AVX-512 or AVX2 and FMA3");
  return *backend;
}

// The kernels an entry point runs: the chosen ones, else the best present.
const Backend& kernels(const char* function) {
  const Backend* backend = chosen();
  return backend != nullptr ? *backend : present(function);
}

}  // namespace

bool available() { return chosen() != nullptr; }

float exp2_scaled_sum(float* s, int64_t n, float c, float m) {
  static const auto kernel = present("exp2_scaled_sum").exp2_scaled_sum;
  return kernel(s, n, c, m);
}

void exp2_scaled(float* s, int64_t n, float c, float m) {
  static const auto kernel = present("exp2_scaled").exp2_scaled;
  kernel(s, n, c, m);
}

// Not on Intel's CPUs, for which MKL is tuned: on 2 Xeon cores (AVX-512, AMX) its
// sgemm ran at the FMA peak, 327-333 GFLOP/s at 2048^3, where the packed kernel
// reached 260 (on AMD's Zen 4, 62% of the peak against ~85%: README, CPU GEMMs).
// TFKERNELS_CPU_F32_DOT=whole runs them on our kernels there too (the tests do).
bool whole_gemms_available() {
  const Backend* backend = chosen();
  if (backend == nullptr || !backend->whole_gemms) return false;
  const char* value = std::getenv("TFKERNELS_CPU_F32_DOT");
  return !cpu_is_intel() || (value != nullptr && std::string(value) == "whole");
}

void pack_transposed(const float* src, int64_t ld, int64_t n, int64_t cols, float* dst, int64_t ldp) {
  TORCH_CHECK(ldp >= packed_ld(n), "f32dot::pack_transposed: ldp ", ldp, " < packed_ld(", n, ") = ", packed_ld(n));
  kernels("pack_transposed").pack_transposed(src, ld, n, cols, dst, ldp);
}

void gemm(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t a_row, int64_t a_step, const float* b,
          int64_t ldb, float alpha, float* c, int64_t ldc, bool accumulate) {
  kernels("gemm").gemm(m, cols, depth, a, a_row, a_step, b, ldb, alpha, c, ldc, accumulate);
}

void gemm_packed(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  kernels("gemm_packed").gemm_packed(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
}

// PackedB storage comes from warm_buffers.h: packing a 16 MiB weight into fresh
// memory cost as much as the repacking it saves (4096 page faults: fused_mlp's fp32
// forward ran 6-13% slower than with per-call panels on the 2-core Zen 4 VM).
PackedB::PackedB(int64_t k, int64_t n)
    : block_(warm::take(static_cast<size_t>((n + kCols - 1) / kCols * k * kCols) * sizeof(float))),
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
  const Backend& backend = kernels("pack_b");
  PackedB out(k, n);
  const int64_t panels = (n + PackedB::kCols - 1) / PackedB::kCols;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t c0 = panel * PackedB::kCols;
      backend.pack_panel(trans_b, b, ldb, 0, c0, k, std::min(PackedB::kCols, n - c0), out.panel(panel));
    }
  });
  return out;
}

void gemm_prepacked(bool trans_a, int64_t m, int64_t cols, int64_t depth, float alpha, const float* a, int64_t lda,
                    const PackedB& b, int64_t k0, int64_t c0, float* c, int64_t ldc, bool accumulate) {
  TORCH_CHECK(k0 >= 0 && depth >= 0 && k0 + depth <= b.k() && c0 >= 0 && cols >= 0 && c0 + cols <= b.n(),
              "f32dot::gemm_prepacked: steps [", k0, ", ", k0 + depth, ") x columns [", c0, ", ", c0 + cols,
              ") outside the packed ", b.k(), " x ", b.n());
  kernels("gemm_prepacked")
      .gemm_prepacked(trans_a, m, cols, depth, alpha, a, lda, b.panel(0), b.k() * PackedB::kCols, k0, c0, c, ldc,
                      accumulate);
}

void gemm_row_max(int64_t m, int64_t cols, int64_t depth, const float* a, int64_t lda, const PackedB& b, int64_t c0,
                  float* c, int64_t ldc, float* row_max) {
  TORCH_CHECK(depth >= 0 && depth <= b.k() && c0 >= 0 && cols >= 0 && c0 + cols <= b.n(), "f32dot::gemm_row_max: ",
              depth, " steps x columns [", c0, ", ", c0 + cols, ") outside the packed ", b.k(), " x ", b.n());
  kernels("gemm_row_max").gemm_row_max(m, cols, depth, a, lda, b.panel(0), b.k() * PackedB::kCols, c0, c, ldc, row_max);
}

}  // namespace tfkernels::cpu::f32dot
