// Instantiation of the fused QKV projection for fp16 (own translation unit so the
// dtypes compile in parallel). CUDA headers only.
#include "cuda/gemm/qkv_impl.cuh"

namespace tfkernels {
namespace gemm {

template cudaError_t qkv_forward<__half>(const QkvFwdParams& params, cudaStream_t stream);
template cudaError_t qkv_backward<__half>(const QkvBwdParams& params, cudaStream_t stream);

}  // namespace gemm
}  // namespace tfkernels
