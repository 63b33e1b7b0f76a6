// What the torch-facing CUDA launchers (csrc/cuda/*.cpp) share beyond the device
// context: the dtype mapping onto the kernels' DType and the dispatch of a launch
// on it, the 16-byte alignment test
// that picks vectorised kernels, and the checks of CUDA's size limits. Host code
// with torch headers: for .cpp launchers only, never for kernel files.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "cuda/common/device_context.h"
#include "cuda/common/dtype.h"
#include "cuda/common/grid.h"

namespace tfkernels {
namespace cuda {

// float32, float16 or bfloat16 (the launchers' dtype checks come first).
inline DType dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK(false, "tfkernels: the CUDA kernels have no instantiation for dtype ", dtype);
  }
}
inline DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }

// Runs launch(TypeTag<T>{}, stream) for `dtype` on the current stream and turns the
// cudaError_t it returns into an exception. No synchronisation.
//   launch_for_dtype(x.scalar_type(), [&](auto tag, cudaStream_t s) {
//     return entry<tag_type<decltype(tag)>>(params, s);
//   });
template <class F>
void launch_for_dtype(at::ScalarType dtype, F&& launch) {
  const cudaStream_t stream = device::current_stream();
  TFKERNELS_CHECK_LAUNCH(dispatch_dtype(dtype_of(dtype), [&](auto tag) { return launch(tag, stream); }));
}

// Every row of t (last dim contiguous) can be read and written in 16-byte
// accesses: the base pointer is 16-byte aligned and so is every stride that can
// multiply a non-zero index (dims of size > 1, the last excepted). The width of a
// row (a multiple of 16 bytes or not) is the caller's condition.
inline bool aligned16(const at::Tensor& t) {
  if (!is_aligned(t.data_ptr(), 16)) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && (t.stride(d) * static_cast<int64_t>(t.element_size())) % 16 != 0) return false;
  }
  return true;
}

// CUDA's and the kernels' size limits: grid dims y and z hold at most 65535 blocks,
// and the kernels index rows, columns and reductions with int32.
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// `what` (e.g. "heads and batches") of `op` on CUDA must each be at most `limit`.
inline void check_limit(const char* op, const char* what, std::initializer_list<int64_t> values, int64_t limit) {
  for (int64_t v : values) {
    TORCH_CHECK(v <= limit, "tfkernels: ", op, " on CUDA supports ", what, " up to ", limit, ", got ", v);
  }
}

}  // namespace cuda
}  // namespace tfkernels
