// Probe kernels for the PTX primitives of csrc/cuda/common/ptx.h: each runs one
// primitive on inputs given per lane and writes what every lane receives, so that
// tests/test_ptx_primitives.py can check it against the PTX ISA's fragment tables
// (written there independently, from the ISA). The same probes run on a real GPU
// (where they check the tables against the hardware) and on the emulated device
// (where they check the emulator). One warp, one block; not performance code.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/ptx.h"
#include "cuda/probe/ptx_probe.h"

namespace tfkernels {
namespace probe {
namespace {

__global__ void ptx_probe_kernel(Probe probe, const int32_t* in, int32_t* out, int n, uint32_t divisor_m,
                                 uint32_t divisor_s, uint32_t divisor_d) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x;
  switch (probe) {
    case Probe::kLdmatrixX4:
    case Probe::kLdmatrixX4Trans:
    case Probe::kLdmatrixX2:
    case Probe::kLdmatrixX2Trans: {
      // in: 32 rows x 8 b16 (16 bytes a row); lane l supplies the address of row l.
      reinterpret_cast<int32_t*>(smem)[lane * 4 + 0] = in[lane * 4 + 0];
      reinterpret_cast<int32_t*>(smem)[lane * 4 + 1] = in[lane * 4 + 1];
      reinterpret_cast<int32_t*>(smem)[lane * 4 + 2] = in[lane * 4 + 2];
      reinterpret_cast<int32_t*>(smem)[lane * 4 + 3] = in[lane * 4 + 3];
      __syncthreads();
      const void* row = smem + lane * 16;
      uint32_t r[4] = {0, 0, 0, 0};
      if (probe == Probe::kLdmatrixX4) {
        cuda::ldmatrix_x4(r, row);
      } else if (probe == Probe::kLdmatrixX4Trans) {
        cuda::ldmatrix_x4_trans(r, row);
      } else {
        uint32_t r2[2];
        if (probe == Probe::kLdmatrixX2) {
          cuda::ldmatrix_x2(r2, row);
        } else {
          cuda::ldmatrix_x2_trans(r2, row);
        }
        r[0] = r2[0];
        r[1] = r2[1];
      }
      for (int i = 0; i < 4; ++i) out[lane * 4 + i] = static_cast<int32_t>(r[i]);
      break;
    }
    case Probe::kMmaF16:
    case Probe::kMmaBf16:
    case Probe::kMmaTf32: {
      // in: per lane a[4], b[2], c[4] (c as fp32 bits); out: d[4] as fp32 bits.
      const int32_t* mine = in + lane * 10;
      const uint32_t a[4] = {uint32_t(mine[0]), uint32_t(mine[1]), uint32_t(mine[2]), uint32_t(mine[3])};
      const uint32_t b[2] = {uint32_t(mine[4]), uint32_t(mine[5])};
      float d[4];
      for (int i = 0; i < 4; ++i) d[i] = __int_as_float(mine[6 + i]);
      if (probe == Probe::kMmaF16) {
        cuda::mma_16816<__half>(d, a, b);
      } else if (probe == Probe::kMmaBf16) {
        cuda::mma_16816<__nv_bfloat16>(d, a, b);
      } else {
        cuda::mma_1688_tf32(d, a, b);
      }
      for (int i = 0; i < 4; ++i) out[lane * 4 + i] = __float_as_int(d[i]);
      break;
    }
    case Probe::kCvtTf32:
      for (int i = lane; i < n; i += 32) out[i] = static_cast<int32_t>(cuda::to_tf32(__int_as_float(in[i])));
      break;
    case Probe::kEx2:
      for (int i = lane; i < n; i += 32) out[i] = __float_as_int(cuda::exp2_approx(__int_as_float(in[i])));
      break;
    case Probe::kFastDiv: {
      cuda::FastDiv div;
      div.d = divisor_d;
      div.m = divisor_m;
      div.s = divisor_s;
      for (int i = lane; i < n; i += 32) out[i] = static_cast<int32_t>(div.div(static_cast<uint32_t>(in[i])));
      break;
    }
    case Probe::kCpAsync: {
      // Three groups of one 16-byte copy per lane: group g copies in[g*128 + 4*lane ..
      // + 4) into region g of shared memory; group 2 is predicated off (zero-fill).
      for (int g = 0; g < 3; ++g) {
        cuda::cp_async_16(smem + g * 512 + lane * 16, in + g * 128 + lane * 4, g != 2);
        cuda::cp_async_commit();
      }
      cuda::cp_async_wait<1>();  // groups 0 and 1 have landed
      __syncthreads();
      for (int i = lane; i < 256; i += 32) out[i] = reinterpret_cast<const int32_t*>(smem)[i];
      cuda::cp_async_wait<0>();
      __syncthreads();
      for (int i = lane; i < 128; i += 32) out[256 + i] = reinterpret_cast<const int32_t*>(smem + 1024)[i];
      break;
    }
  }
}

}  // namespace

cudaError_t run_ptx_probe(Probe probe, const int32_t* in, int32_t* out, int n, uint32_t divisor,
                          cudaStream_t stream) {
  const cuda::FastDiv div(divisor == 0 ? 1 : divisor);
  ptx_probe_kernel<<<1, 32, 1536, stream>>>(probe, in, out, n, div.m, div.s, div.d);
  return cudaGetLastError();
}

}  // namespace probe
}  // namespace tfkernels
