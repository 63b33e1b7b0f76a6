// Instantiation of the fused QKV projection for one dtype (own translation unit so
// the dtypes compile in parallel). CUDA headers only.
#include "cuda/gemm/qkv_impl.cuh"

namespace tfkernels {
namespace cuda {
namespace gemm {

cudaError_t qkv_forward_f32(const QkvFwdArgs& args, cudaStream_t stream) {
  return qkv_forward_impl<float>(args, stream);
}

cudaError_t qkv_backward_f32(const QkvBwdArgs& args, cudaStream_t stream) {
  return qkv_backward_impl<float>(args, stream);
}

}  // namespace gemm
}  // namespace cuda
}  // namespace tfkernels
