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
// The AMX tile loads and stores also run at about half speed on rows that straddle
// two cache lines (amx_dot.cpp's C blocks: 1.4 against 1.8 TFLOP/s per core).
template <typename T>
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) { grow(n); }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  T& operator[](int64_t i) { return p_[i]; }

  // At least n elements (contents undefined after a growth): for thread_local scratch
  // reused across calls of different sizes.
  T* grow(int64_t n) {
    if (n > size_) {
      const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
      std::free(p_);
      p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
      size_ = p_ != nullptr ? n : 0;
      TORCH_CHECK(p_ != nullptr, "tfkernels: could not allocate ", bytes, " bytes of tile scratch");
    }
    return p_;
  }

 private:
  T* p_ = nullptr;
  int64_t size_ = 0;
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
