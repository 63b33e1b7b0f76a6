// bias + GELU forward and backward: elementwise, memory bound, so the whole game
// is moving 16 bytes per load and store. CUDA headers and our own only.
//
// Forward: a flat grid-stride loop over 16-byte vectors of x/out (8 bf16/fp16 or
// 4 float). The bias index is the flat index modulo N; when N is a multiple of the
// vector width the bias loads as a vector too, otherwise it is gathered per element
// (odd N keeps the vector loads of x and out). Misaligned x/out (a view at an odd
// offset) fall back to one element per access; the last numel % VEC elements are
// done one per thread after the vector loop.
//
// Backward: a 2-D grid, blockIdx.x over tiles of 32 * VEC columns, blockIdx.y over
// chunks of rows. Each thread walks its rows with stride 8, writes grad_x and keeps
// float sums of its VEC columns in registers; the block adds its 8 row-groups in
// shared memory in a fixed order and writes one float partial per column and row
// chunk. A second, tiny kernel adds the chunks in order into grad_bias. No float
// atomics: the result is bitwise reproducible run to run. The tiling depends only
// on the shape and pointer alignment, never on the device.
#include "cuda/bias_gelu/bias_gelu_params.h"
#include "cuda/common/convert.h"
#include "cuda/common/dtype.h"
#include "cuda/common/grid.h"
#include "cuda/common/vector_io.h"
#include "gelu.h"

namespace tfkernels {
namespace bias_gelu {

namespace {

using cuda::AlignedVector;
using cuda::ceil_div;
using cuda::from_float;
using cuda::grid_for;
using cuda::is_aligned;
using cuda::kVec16;
using cuda::load_vector;
using cuda::store_vector;
using cuda::to_float;

constexpr int kFwdThreads = 256;

template <typename T, int VEC, bool kTanh, bool kBiasVec>
__global__ void __launch_bounds__(kFwdThreads)
    bias_gelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, int64_t numel,
                         int64_t cols) {
  const int64_t n_vec = numel / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < n_vec; v += stride) {
    const int64_t i = v * VEC;
    const AlignedVector<T, VEC> xv = load_vector<T, VEC>(x + i);
    int64_t col = i % cols;
    AlignedVector<T, VEC> bv;
    if constexpr (kBiasVec) {
      bv = load_vector<T, VEC>(bias + col);  // cols % VEC == 0: the vector stays in one row
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        bv.val[k] = bias[col];
        if (++col == cols) col = 0;
      }
    }
    AlignedVector<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ov.val[k] = from_float<T>(gelu<kTanh, float>(to_float(xv.val[k]) + to_float(bv.val[k])));
    }
    store_vector<T, VEC>(out + i, ov);
  }
  if constexpr (VEC > 1) {
    // Tail: fewer than VEC elements, one per thread of the first threads.
    const int64_t i = n_vec * VEC + tid;
    if (i < numel) out[i] = from_float<T>(gelu<kTanh, float>(to_float(x[i]) + to_float(bias[i % cols])));
  }
}

constexpr int kBwdThreadsX = 32;
constexpr int kBwdThreadsY = 8;
constexpr int kBwdThreads = kBwdThreadsX * kBwdThreadsY;
// Blocks the backward aims for (row chunks x column tiles): ~8 per SM on an H100,
// enough to saturate memory. A constant, so the reduction order is the same on
// every device.
constexpr int64_t kBwdTargetBlocks = 1024;
// Fewer rows per chunk than this makes the partials cost more than they save.
constexpr int64_t kBwdMinRowsPerChunk = 64;

template <typename T, int VEC, bool kTanh>
__global__ void __launch_bounds__(kBwdThreads)
    bias_gelu_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const T* __restrict__ bias,
                         T* __restrict__ grad_x, float* __restrict__ partial, T* __restrict__ grad_bias,
                         int64_t rows, int64_t cols, int64_t rows_per_chunk) {
  constexpr int kTileCols = kBwdThreadsX * VEC;
  // Laid out [row group][k * 32 + tx] so that the stores below are conflict free.
  __shared__ float sums[kBwdThreadsY][kTileCols];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t tile_col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t col = tile_col0 + static_cast<int64_t>(tx) * VEC;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(rows, row_begin + rows_per_chunk);

  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;

  // VEC > 1 only when cols % VEC == 0, so col < cols covers the whole vector.
  if (col < cols) {
    float b[VEC];
    const AlignedVector<T, VEC> bv = load_vector<T, VEC>(bias + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) b[k] = to_float(bv.val[k]);
    for (int64_t r = row_begin + ty; r < row_end; r += kBwdThreadsY) {
      const int64_t off = r * cols + col;
      const AlignedVector<T, VEC> gv = load_vector<T, VEC>(grad_out + off);
      const AlignedVector<T, VEC> xv = load_vector<T, VEC>(x + off);
      AlignedVector<T, VEC> dv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float g = to_float(gv.val[k]) * gelu_grad<kTanh, float>(to_float(xv.val[k]) + b[k]);
        dv.val[k] = from_float<T>(g);
        acc[k] += g;
      }
      store_vector<T, VEC>(grad_x + off, dv);
    }
  }

#pragma unroll
  for (int k = 0; k < VEC; ++k) sums[ty][k * kBwdThreadsX + tx] = acc[k];
  __syncthreads();

  const int tid = ty * kBwdThreadsX + tx;
  for (int j = tid; j < kTileCols; j += kBwdThreads) {
    const int64_t c = tile_col0 + static_cast<int64_t>(j % kBwdThreadsX) * VEC + j / kBwdThreadsX;
    if (c >= cols) continue;
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kBwdThreadsY; ++y) s += sums[y][j];
    if (partial != nullptr) {
      partial[static_cast<int64_t>(blockIdx.y) * cols + c] = s;
    } else {
      grad_bias[c] = from_float<T>(s);
    }
  }
}

// grad_bias[c] = sum over chunks of partial[chunk, c], chunks in order.
template <typename T>
__global__ void __launch_bounds__(kFwdThreads)
    bias_grad_reduce_kernel(const float* __restrict__ partial, T* __restrict__ grad_bias, int64_t chunks,
                            int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += stride) {
    float s = 0.f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * cols + c];
    grad_bias[c] = from_float<T>(s);
  }
}

template <typename T>
bool fwd_vectorizable(const BiasGeluParams& p) {
  return is_aligned(p.x, 16) && is_aligned(p.out, 16);
}

template <typename T, bool kTanh>
void launch_fwd_typed(const BiasGeluParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const auto* x = static_cast<const T*>(p.x);
  const auto* bias = static_cast<const T*>(p.bias);
  auto* out = static_cast<T*>(p.out);
  const int64_t numel = p.rows * p.cols;
  if (fwd_vectorizable<T>(p)) {
    // The grid covers the vectors; the tail (< V elements) needs no more than one block.
    const unsigned int grid = grid_for(numel / V, kFwdThreads);
    if (p.cols % V == 0 && is_aligned(p.bias, 16)) {
      bias_gelu_fwd_kernel<T, V, kTanh, true><<<grid, kFwdThreads, 0, stream>>>(x, bias, out, numel, p.cols);
    } else {
      bias_gelu_fwd_kernel<T, V, kTanh, false><<<grid, kFwdThreads, 0, stream>>>(x, bias, out, numel, p.cols);
    }
  } else {
    bias_gelu_fwd_kernel<T, 1, kTanh, false>
        <<<grid_for(numel, kFwdThreads), kFwdThreads, 0, stream>>>(x, bias, out, numel, p.cols);
  }
}

struct BwdPlan {
  int vec;
  int64_t col_tiles;
  int64_t chunks;
  int64_t rows_per_chunk;
};

template <typename T>
BwdPlan plan_bwd_typed(const BiasGeluBwdParams& p) {
  constexpr int V = kVec16<T>;
  BwdPlan plan{};
  const bool vec = p.cols % V == 0 && is_aligned(p.grad_out, 16) && is_aligned(p.x, 16) &&
                   is_aligned(p.grad_x, 16) && is_aligned(p.bias, 16);
  plan.vec = vec ? V : 1;
  plan.col_tiles = ceil_div<int64_t>(p.cols, int64_t{kBwdThreadsX} * plan.vec);
  const int64_t max_chunks = ceil_div<int64_t>(p.rows, kBwdMinRowsPerChunk);
  int64_t chunks = ceil_div<int64_t>(kBwdTargetBlocks, plan.col_tiles);
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  plan.rows_per_chunk = ceil_div<int64_t>(p.rows, chunks);
  plan.chunks = ceil_div<int64_t>(p.rows, plan.rows_per_chunk);
  return plan;
}

BwdPlan plan_bwd(const BiasGeluBwdParams& p) {
  return cuda::dispatch_dtype(p.dtype, [&](auto tag) { return plan_bwd_typed<typename decltype(tag)::type>(p); });
}

template <typename T, bool kTanh>
void launch_bwd_typed(const BiasGeluBwdParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const BwdPlan plan = plan_bwd_typed<T>(p);
  const auto* grad_out = static_cast<const T*>(p.grad_out);
  const auto* x = static_cast<const T*>(p.x);
  const auto* bias = static_cast<const T*>(p.bias);
  auto* grad_x = static_cast<T*>(p.grad_x);
  auto* grad_bias = static_cast<T*>(p.grad_bias);
  float* partial = plan.chunks > 1 ? p.workspace : nullptr;
  const dim3 grid(static_cast<unsigned int>(plan.col_tiles), static_cast<unsigned int>(plan.chunks));
  const dim3 block(kBwdThreadsX, kBwdThreadsY);
  if (plan.vec == V) {
    bias_gelu_bwd_kernel<T, V, kTanh><<<grid, block, 0, stream>>>(grad_out, x, bias, grad_x, partial, grad_bias,
                                                                   p.rows, p.cols, plan.rows_per_chunk);
  } else {
    bias_gelu_bwd_kernel<T, 1, kTanh><<<grid, block, 0, stream>>>(grad_out, x, bias, grad_x, partial, grad_bias,
                                                                   p.rows, p.cols, plan.rows_per_chunk);
  }
  if (partial != nullptr) {
    bias_grad_reduce_kernel<T><<<grid_for(p.cols, kFwdThreads), kFwdThreads, 0, stream>>>(partial, grad_bias,
                                                                                          plan.chunks, p.cols);
  }
}

template <bool kTanh>
void launch_fwd_form(const BiasGeluParams& p, cudaStream_t stream) {
  cuda::dispatch_dtype(p.dtype, [&](auto tag) { launch_fwd_typed<typename decltype(tag)::type, kTanh>(p, stream); });
}

template <bool kTanh>
void launch_bwd_form(const BiasGeluBwdParams& p, cudaStream_t stream) {
  cuda::dispatch_dtype(p.dtype, [&](auto tag) { launch_bwd_typed<typename decltype(tag)::type, kTanh>(p, stream); });
}

}  // namespace

int64_t bias_gelu_bwd_workspace_elems(const BiasGeluBwdParams& params) {
  const BwdPlan plan = plan_bwd(params);
  return plan.chunks > 1 ? plan.chunks * params.cols : 0;
}

cudaError_t launch_bias_gelu(const BiasGeluParams& params, cudaStream_t stream) {
  if (params.rows * params.cols == 0) return cudaSuccess;
  if (params.tanh) {
    launch_fwd_form<true>(params, stream);
  } else {
    launch_fwd_form<false>(params, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_bias_gelu_bwd(const BiasGeluBwdParams& params, cudaStream_t stream) {
  if (params.rows * params.cols == 0) return cudaSuccess;
  if (params.tanh) {
    launch_bwd_form<true>(params, stream);
  } else {
    launch_bwd_form<false>(params, stream);
  }
  return cudaGetLastError();
}

}  // namespace bias_gelu
}  // namespace tfkernels
