// Instantiation of the MLP family (linear_gelu, fused_mlp: forward and backward
// GEMMs, dGELU pass) for fp32, in its own translation unit so the dtypes compile in
// parallel. CUDA headers only.
#include "cuda/gemm/mlp_impl.cuh"

namespace tfkernels {
namespace gemm {

template cudaError_t mlp_gemm<float>(const MlpGemmParams& params, cudaStream_t stream);
template cudaError_t mlp_dgelu<float>(const MlpDGeluParams& params, cudaStream_t stream);

}  // namespace gemm
}  // namespace tfkernels
