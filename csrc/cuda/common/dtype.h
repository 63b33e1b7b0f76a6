// The storage dtypes of the CUDA kernels and the one dispatch from a runtime dtype
// to the C++ type a kernel is instantiated for. Host code only, CUDA headers only:
// the torch-facing launchers map at::ScalarType to DType (launcher_utils.h), the
// kernel translation units dispatch on it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tfkernels {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// A type as a value, so that a generic lambda can receive it:
//   dispatch_dtype(dtype, [&](auto tag) { using T = tag_type<decltype(tag)>; ... });
template <typename T>
struct TypeTag {
  using type = T;
};

template <class Tag>
using tag_type = typename Tag::type;

// Calls f(TypeTag<T>{}) with T = float, __half or __nv_bfloat16 and returns its result.
template <class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: return f(TypeTag<float>{});
  }
}

// The same for code that exists in 16 bits only (the tensor-core flash kernels):
// never instantiates f for float; the caller routes kFloat32 elsewhere first.
template <class F>
decltype(auto) dispatch_16bit(DType dtype, F&& f) {
  if (dtype == DType::kBFloat16) return f(TypeTag<__nv_bfloat16>{});
  return f(TypeTag<__half>{});
}

}  // namespace cuda
}  // namespace tfkernels
