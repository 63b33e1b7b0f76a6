// Small helpers of the tiled CPU attention kernels: aligned per-thread scratch and
// the finiteness test that decides whether a masked tile may go through one GEMM
// (flash_attention.cpp and the KV-cache kernel).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace tfkernels::cpu::tile {

// Per-thread tile scratch, 64-byte aligned: MKL may pick a different code path
// (and so a different rounding) for differently aligned buffers, and std::vector
// gives whatever alignment malloc returns, which can change from run to run.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    if (n > 0) {
      const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p_ != nullptr, "tfkernels: could not allocate ", bytes, " bytes of tile scratch");
    }
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }

 private:
  T* p_ = nullptr;
};

// Whether every element of a rows x cols block (row stride ld) is finite. A tile GEMM
// multiplies the zeroed probabilities of hidden keys with their values, which is exact
// only while those values are finite (0 x Inf = NaN must not reach a row).
template <typename T>
bool all_finite(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      if (!std::isfinite(p[r * ld + j])) return false;
    }
  }
  return true;
}

}  // namespace tfkernels::cpu::tile
