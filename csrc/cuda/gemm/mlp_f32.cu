// Instantiation of the MLP family (linear_gelu, fused_mlp: forward and backward GEMMs,
// dGELU pass) for one dtype, in its own translation unit so the dtypes compile in
// parallel. CUDA headers only.
#include "cuda/gemm/mlp_impl.cuh"

namespace tfkernels {
namespace cuda {
namespace gemm {

cudaError_t mlp_gemm_f32(const MlpGemmArgs& args, cudaStream_t stream) { return mlp_gemm_impl<float>(args, stream); }

cudaError_t mlp_dgelu_f32(const MlpDGeluArgs& args, cudaStream_t stream) {
  return mlp_dgelu_impl<float>(args, stream);
}

}  // namespace gemm
}  // namespace cuda
}  // namespace tfkernels
