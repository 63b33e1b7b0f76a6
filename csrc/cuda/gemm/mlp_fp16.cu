// Instantiation of the MLP family (linear_gelu, fused_mlp: forward and backward
// GEMMs, dGELU pass) for fp16, in its own translation unit so the dtypes compile in
// parallel. CUDA headers only.
#include "cuda/gemm/mlp_impl.cuh"

namespace tfkernels {
namespace gemm {

template cudaError_t mlp_gemm<__half>(const MlpGemmParams& params, cudaStream_t stream);
template cudaError_t mlp_dgelu<__half>(const MlpDGeluParams& params, cudaStream_t stream);

}  // namespace gemm
}  // namespace tfkernels
