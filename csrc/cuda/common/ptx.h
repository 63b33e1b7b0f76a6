// Tensor-core and async-copy primitives (sm_80+) shared by every CUDA kernel:
// the attention kernels and the GEMM core use these instead of their own copies.
// CUDA headers only: kernel translation units must not include torch.
//
// Fragment layouts follow the PTX ISA, "Matrix fragments for mma.m16n8k16":
// A is 16x16 row-major in 4 x .b32 registers (8 halves), B is 16x8 "col" in 2
// registers, C/D are 16x8 fp32 in 4 registers: thread t holds rows t/4 and t/4+8,
// columns 2*(t%4) and 2*(t%4)+1.
//
// The inline-PTX primitives have a second implementation for the emulated device
// (csrc/emu/ptx.h, selected by TFKERNELS_EMULATE), written from the PTX ISA; the
// plain CUDA helpers below them are shared by both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(TFKERNELS_EMULATE)
#include "emu/ptx.h"
#else

namespace tfkernels {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ----------------------------------------------------------------- cp.async

// Copies 16 bytes global -> shared without staging through registers. When
// `in_bounds` is false nothing is read and the 16 shared bytes are zero-filled:
// this is how tile edges are predicated. `gmem` must still be a valid address
// (pass the tensor base when out of bounds).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  const int src_bytes = in_bounds ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ----------------------------------------------------------------- ldmatrix

// Four 8x8 b16 matrices; lane i supplies the row address of row i%8 of matrix i/8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}

// ----------------------------------------------------------------- mma

// D = A * B + D for one 16x8x16 tile, fp32 accumulation. T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// TF32 16x8x8, fp32 accumulation: the fp32 GEMM path when TF32 is allowed.
// Operands are fp32 bit patterns; the tensor core reads their top 19 bits.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// 2^x with the hardware approximation (about 2 ulp), whatever the compile flags:
// ex2.approx(-inf) = +0, which softmax code relies on for masked scores.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuda
}  // namespace tfkernels

#endif  // TFKERNELS_EMULATE

namespace tfkernels {
namespace cuda {

// ----------------------------------------------------------------- packing

// Two fp32 values rounded to one register of two 16-bit values (low half first),
// the layout an A fragment of the next mma expects (e.g. P in attention).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ----------------------------------------------------------------- shared-memory swizzle

// Tiles whose rows are 64 x 16-bit (128 bytes = 8 chunks of 16 bytes) are stored
// with chunk c of row r at chunk c ^ (r % 8). ldmatrix then reads 8 rows of one
// logical chunk from 8 different bank groups: no bank conflicts, no padding.
__device__ __forceinline__ int swizzle_chunk(int row, int chunk) { return chunk ^ (row & 7); }

// ----------------------------------------------------------------- integer division

// n / d for a divisor fixed at launch, by multiply-high and shift instead of the
// ~20-instruction integer division (Granlund-Montgomery; the form CUTLASS's
// FastDivmod uses). Built on the host, used on the device. Valid for
// 1 <= d < 2^31 and 0 <= n < 2^31: then umulhi(n, m) < n, so the sum cannot wrap.
// m = floor(2^32 * (2^s - d) / d) + 1 with s = ceil(log2 d); d = 1 gives m = 1, s = 0.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  __host__ __device__ explicit FastDiv(uint32_t divisor) : d(divisor) {
    s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

// ----------------------------------------------------------------- math and warp reductions

// Reductions over groups of kWidth consecutive lanes (kWidth a power of two <= 32):
// kWidth = 4 reduces the four threads that share a row of an mma C fragment.
// group_max drops NaN (fmaxf returns the other operand). The softmax kernels rely
// on that being harmless: a NaN score still reaches the row sum as exp2(NaN) = NaN,
// which makes the row's O and lse NaN (flash_fwd_kernel.h).
template <int kWidth>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int mask = kWidth / 2; mask > 0; mask /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

template <int kWidth>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int mask = kWidth / 2; mask > 0; mask /= 2) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

}  // namespace cuda
}  // namespace tfkernels
