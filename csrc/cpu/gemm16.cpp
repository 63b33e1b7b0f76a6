// The 16-bit GEMM backend choice and the blocked mm (gemm16.h).
#include "cpu/gemm16.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "cpu/cpu_caps.h"
#include "cpu/gelu_rows.h"
#include "cpu/warm_buffers.h"

namespace tfkernels::cpu {
namespace {

struct NativeDot16 {
  bool bf16, half;
};

NativeDot16 detect_native_dot16() {
  return {cpu_has("avx512_bf16") || cpu_has("amx_bf16"), cpu_has("avx512_fp16") || cpu_has("amx_fp16")};
}

// Output rows per task of mm_out_cpu's bf16 path: an fp32 block of kRows x N stays in L2 for
// N up to ~1000, and 2048-row problems still give every thread several tasks.
constexpr int64_t kRows = 128;

// A 2-D operand as gemm_rm takes it: data, leading dim, and whether it is stored
// transposed (column-major view of a row-major buffer).
template <typename T>
struct Operand {
  const T* data;
  int64_t ld;
  bool trans;
};

// `t` has a unit stride in one dim (mm_row_blocks makes sure). A dim of size 1 may carry any
// stride, hence the max: BLAS wants a leading dim of at least the row length.
template <typename T>
Operand<T> operand(const at::Tensor& t) {
  if (t.stride(1) == 1) return {t.const_data_ptr<T>(), std::max(t.stride(0), t.size(1)), false};
  return {t.const_data_ptr<T>(), std::max(t.stride(1), t.size(0)), true};
}

// out = a @ b in blocks of kRows output rows, one gemm_rm per block on its thread:
// fp32 straight into out, 16-bit into an fp32 block rounded once.
template <typename T>
void mm_row_blocks(at::Tensor& out, const at::Tensor& a_, const at::Tensor& b_) {
  const at::Tensor a = (a_.stride(1) == 1 || a_.stride(0) == 1) ? a_ : a_.contiguous();
  const at::Tensor b = (b_.stride(1) == 1 || b_.stride(0) == 1) ? b_ : b_.contiguous();
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const Operand<T> A = operand<T>(a), B = operand<T>(b);
  const SharedB<T> shared = share_b(B.trans, B.data, B.ld, k, n);  // fp32: packed once for every block
  T* c = out.mutable_data_ptr<T>();
  // fp32: a 256 x 256 block of A is 256 KiB, in L2.
  const int64_t block = std::is_same_v<T, float> ? rows_per_task(m, 2 * kRows, at::get_num_threads()) : kRows;
  at::parallel_for(0, ceil_div(m, block), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(std::is_same_v<T, float> ? 0 : static_cast<size_t>(kRows * n));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * block, rows = std::min(block, m - r0);
      const T* a0 = A.trans ? A.data + r0 : A.data + r0 * A.ld;
      float* dst = [&] {
        if constexpr (std::is_same_v<T, float>) return c + r0 * n;
        else return acc.data();
      }();
      gemm_rm_shared<T, float>(A.trans, rows, n, k, 1.0f, a0, A.ld, shared, 0, 0, 0.0f, dst, n);
      if constexpr (!std::is_same_v<T, float>) {
        for (int64_t i = 0; i < rows; ++i) store_row(acc.data() + i * n, c + (r0 + i) * n, n);
      }
    }
  });
}

// Whether mm_out_cpu's bf16 product runs on bf16_dot's tiles (mm_bf16_tiles): oneDNN's
// backend where the tiles beat it (bf16dot::prepacked_applies: AVX512-BF16 without
// AMX), and operands that the packing reads as whole pairs: an odd k only where both
// operands are packed (a transposed A, a row-major B: the packing pads the last pair
// with zeros; a row-major A would read one element past its rows).
bool mm_on_bf16_tiles(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kBFloat16 || gemm16_backend(at::kBFloat16) != Gemm16::kOneDnn) return false;
  const int64_t k = a.size(1);
  const bool a_rows = a.stride(1) == 1, a_cols = a.stride(0) == 1;
  const bool b_rows = b.stride(1) == 1, b_cols = b.stride(0) == 1;
  if (!bf16dot::prepacked_applies(k + k % 2) || !(a_rows || a_cols)) return false;
  if (k % 2 == 1) return !a_rows && b_rows;
  return b_rows || (b_cols && b.stride(1) % 2 == 0);
}

// out = a @ b (+ bias, fp32, when not null) on bf16_dot's tiles: op(B) packed once
// into panels of pairs, A read in place when its rows are contiguous, else each task
// packs its rows' pairs (pack_row_pairs); each output's fp32 sum over all of k (and
// the bias) is rounded once in registers.
void mm_bf16_tiles(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const float* bias = nullptr) {
  using T = c10::BFloat16;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1), pairs = (k + 1) / 2;
  const f32dot::PackedB packed = b.stride(1) == 1
      ? bf16dot::pack_rows(b.const_data_ptr<T>(), std::max(b.stride(0), n), k, n)
      : bf16dot::pack_weight_transposed(b.const_data_ptr<T>(), b.stride(1), k, n);
  const bool a_rows = a.stride(1) == 1;
  const int64_t lda = a_rows ? std::max(a.stride(0), k) : std::max(a.stride(1), m);
  const T* a0 = a.const_data_ptr<T>();
  const int64_t block = rows_per_task(m, kRows, at::get_num_threads());
  T* c = out.mutable_data_ptr<T>();
  at::parallel_for(0, ceil_div(m, block), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> a_pairs(a_rows ? 0 : static_cast<size_t>(pairs * bf16dot::packed_ld(block)));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * block, rows = std::min(block, m - r0);
      if (a_rows) {
        bf16dot::gemm_prepacked_rounded(rows, n, pairs, a0 + r0 * lda, lda, 2, packed, 0, 0, bias, c + r0 * n, n);
      } else {
        const int64_t ldp = bf16dot::packed_ld(rows);
        bf16dot::pack_row_pairs(a0 + r0, lda, k, rows, a_pairs.data(), ldp);
        bf16dot::gemm_prepacked_rounded(rows, n, pairs, reinterpret_cast<const T*>(a_pairs.data()), 2, 2 * ldp,
                                        packed, 0, 0, bias, c + r0 * n, n);
      }
    }
  });
}

// A transposed view of a row-major 16-bit matrix (a = t.t(), t contiguous m x n with
// n even), copied row-major: transpose16 in 256 x 256 blocks, one per task.
at::Tensor row_major_copy16(const at::Tensor& a) {
  constexpr int64_t kBlock = 256;
  const int64_t rows = a.size(1), cols = a.size(0);  // of the stored matrix t
  at::Tensor dst = warm::empty({cols, rows}, a.options());
  const auto* src = static_cast<const uint16_t*>(a.const_data_ptr());
  auto* out = static_cast<uint16_t*>(dst.mutable_data_ptr());
  const int64_t row_blocks = ceil_div(rows, kBlock), col_blocks = ceil_div(cols, kBlock);
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(static_cast<size_t>(kBlock / 2 * f32dot::packed_ld(kBlock)));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = (t / col_blocks) * kBlock, c0 = (t % col_blocks) * kBlock;
      bf16dot::transpose16(src + r0 * cols + c0, cols, std::min(kBlock, rows - r0), std::min(kBlock, cols - c0),
                           out + c0 * rows + r0, rows, words.data());
    }
  });
  return dst;
}

// Whether a is the transposed view of a contiguous 16-bit matrix that transpose16
// takes (an even row length) and the copy's rows are whole 32-element blocks (the
// copy would otherwise need blas.h's whole_blocks_reduction16, while oneDNN pads the
// transposed view itself).
bool transposed_view16(const at::Tensor& a) {
  return (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf) && a.stride(0) == 1 &&
         a.stride(1) == a.size(0) && a.size(0) % 2 == 0 && a.size(1) % 32 == 0 && bf16dot::available();
}

}  // namespace

Gemm16 gemm16_backend(at::ScalarType dtype) {
  static const NativeDot16 native = detect_native_dot16();
  if (const char* env = std::getenv("TFKERNELS_CPU_GEMM16")) {
    const std::string choice(env);
    if (choice == "onednn") return Gemm16::kOneDnn;
    if (choice == "blas") return Gemm16::kBlas;
    TORCH_CHECK(choice.empty() || choice == "auto",
                "TFKERNELS_CPU_GEMM16 must be auto, onednn or blas, got \"", choice, "\"");
  }
  const bool fast = dtype == at::kBFloat16 ? native.bf16 : dtype == at::kHalf ? native.half : true;
  return fast ? Gemm16::kOneDnn : Gemm16::kBlas;
}

void linear_bf16_tiles(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const float* bias) {
  const at::Tensor wt = w.t();
  TORCH_CHECK(out.is_contiguous() && x.numel() > 0 && w.numel() > 0 && mm_on_bf16_tiles(x, wt),
              "linear_bf16_tiles: operands that bf16_dot's tiles do not take");
  mm_bf16_tiles(out, x, wt, bias);
}

void mm_out_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = a.scalar_type();
  const bool is16 = dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool plain = out.is_contiguous() && a.numel() > 0 && b.numel() > 0;
  if (dtype == at::kFloat && plain && f32dot::whole_gemms_available()) {
    mm_row_blocks<float>(out, a, b);  // gemm_rm's fp32 kernel, one row block per task
    return;
  }
  if (plain && mm_on_bf16_tiles(a, b)) {
    mm_bf16_tiles(out, a, b);
    return;
  }
  if (!is16 || gemm16_backend(dtype) == Gemm16::kOneDnn || !plain) {
    if (plain && is16 && transposed_view16(a)) {
      at::mm_out(out, row_major_copy16(a), b);
    } else {
      const auto [a_whole, b_whole] = whole_blocks_reduction16(a, b);
      at::mm_out(out, a_whole, b_whole);
    }
    return;
  }
  if (dtype == at::kBFloat16) {
    mm_row_blocks<c10::BFloat16>(out, a, b);
  } else {
    // MKL has no fast half GEMM: widen each operand once (gemm_rm would widen B
    // again for every row block), one multithreaded sgemm, one rounding.
    out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  }
}

}  // namespace tfkernels::cpu
