// The CUDA C++ device language on the CPU: what the stand-in <cuda_runtime.h>,
// <cuda_fp16.h> and <cuda_bf16.h> of csrc/emu/include/ provide to the unmodified
// kernel sources when they are compiled by the host compiler with
// -DTFKERNELS_EMULATE. Qualifiers become plain C++, the built-in indices read the
// running fiber's context, and synchronisation, shuffles and atomics call the
// engine (runtime.h). The `<<<grid, block, smem, stream>>>` syntax is rewritten at
// build time (rewrite_sources.py) into `kernel / LaunchConfig(__FILE__, __LINE__, ...)(args...)`.
#pragma once

#include <math.h>  // the C float functions (expf, fmaxf, ...) at global scope

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu/half_types.h"
#include "emu/runtime.h"

#ifndef TFKERNELS_EMULATE
#error "csrc/emu/ is the emulated device: compile it with -DTFKERNELS_EMULATE"
#endif

// ----------------------------------------------------------------- qualifiers
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static const

// ----------------------------------------------------------------- vector types and dims
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

#define threadIdx (::tfkernels::emu::this_thread().thread_idx)
#define blockIdx (::tfkernels::emu::this_thread().block_idx)
#define blockDim (::tfkernels::emu::this_thread().block_dim)
#define gridDim (::tfkernels::emu::this_thread().grid_dim)
constexpr int warpSize = 32;

// ----------------------------------------------------------------- runtime API subset
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return static_cast<cudaError_t>(::tfkernels::emu::take_last_error()); }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "emulated CUDA error";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    ::tfkernels::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}

// ----------------------------------------------------------------- synchronisation
#define __syncthreads() ::tfkernels::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(...) ::tfkernels::emu::syncthreads_count((__VA_ARGS__), __FILE__, __LINE__)
#define __syncthreads_or(...) (::tfkernels::emu::syncthreads_count((__VA_ARGS__), __FILE__, __LINE__) != 0)
#define __syncthreads_and(...) (::tfkernels::emu::syncthreads_count(!(__VA_ARGS__), __FILE__, __LINE__) == 0)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::tfkernels::emu::warp_exchange(::tfkernels::emu::Collective::kSyncwarp, mask, nullptr, 0, "__syncwarp");
}

namespace tfkernels {
namespace emu {

// Shuffles per the CUDA programming guide's definitions: lanes are split into
// segments of `width`; a source outside the caller's segment (xor, down, up)
// returns the caller's own value.
enum class ShuffleKind { kIndex, kXor, kDown, kUp };

template <typename T>
T shuffle(ShuffleKind kind, unsigned mask, T var, int arg, int width) {
  static_assert(sizeof(T) <= kSlotBytes && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
  const unsigned char* slots = warp_exchange(Collective::kShuffle, mask, &var, sizeof(T), "shuffle");
  const int lane = this_thread().lane;
  const int segment = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case ShuffleKind::kIndex: src = segment + (arg & (width - 1)); break;
    case ShuffleKind::kXor: src = lane ^ arg; break;
    case ShuffleKind::kDown: src = lane + arg; break;
    case ShuffleKind::kUp: src = lane - arg; break;
  }
  if (src < segment || src >= segment + width) src = lane;
  T out;
  std::memcpy(&out, slots + static_cast<size_t>(src) * kSlotBytes, sizeof(T));
  return out;
}

}  // namespace emu
}  // namespace tfkernels

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::tfkernels::emu::shuffle(::tfkernels::emu::ShuffleKind::kIndex, mask, var, src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::tfkernels::emu::shuffle(::tfkernels::emu::ShuffleKind::kXor, mask, var, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::tfkernels::emu::shuffle(::tfkernels::emu::ShuffleKind::kDown, mask, var, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::tfkernels::emu::shuffle(::tfkernels::emu::ShuffleKind::kUp, mask, var, static_cast<int>(delta), width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int mine = predicate != 0;
  const unsigned char* slots =
      ::tfkernels::emu::warp_exchange(::tfkernels::emu::Collective::kVote, mask, &mine, sizeof(int), "__ballot_sync");
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l) & 1u) {
      int v;
      std::memcpy(&v, slots + static_cast<size_t>(l) * ::tfkernels::emu::kSlotBytes, sizeof(int));
      out |= static_cast<unsigned>(v != 0) << l;
    }
  }
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// ----------------------------------------------------------------- atomics
// Fibers of one launch share one OS thread and never switch inside these, so a
// plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}

// ----------------------------------------------------------------- integer and float intrinsics
// CUDA's global min/max overloads (int, unsigned, 64-bit, float, double), with the
// usual arithmetic conversions for mixed arguments.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(b) < static_cast<T>(a) ? static_cast<T>(b) : static_cast<T>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(b) : static_cast<T>(a);
}

inline float __int_as_float(int x) { return ::tfkernels::emu::bits_float(static_cast<uint32_t>(x)); }
inline int __float_as_int(float f) { return static_cast<int>(::tfkernels::emu::float_bits(f)); }

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// Built with --use_fast_math the device versions are approximations; the host's
// correctly rounded functions stand in for them (results may differ in the last
// bits; tests compare with tolerances, never bitwise against a GPU).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// ----------------------------------------------------------------- launches
namespace tfkernels {
namespace emu {

std::string kernel_display_name(const void* kernel);

template <typename... Args>
struct PendingLaunch {
  const char* file;
  int line;
  Dim3 grid, block;
  size_t smem;
  std::tuple<Args...> args;
};

struct LaunchConfig {
  const char* file;
  int line;
  Dim3 grid, block;
  size_t smem;
  LaunchConfig(const char* launch_file, int launch_line, dim3 g, dim3 b, size_t shared = 0, cudaStream_t = nullptr)
      : file(launch_file), line(launch_line), grid{g.x, g.y, g.z}, block{b.x, b.y, b.z}, smem(shared) {}
  template <typename... Args>
  PendingLaunch<std::decay_t<Args>...> operator()(Args&&... args) const {
    return {file, line, grid, block, smem, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
  }
};

// The kernel's parameters, converted from the call's arguments as a launch
// would, then copied by every thread (the GPU's parameter space).
template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> params;
  static void run(const void* self) {
    const auto* b = static_cast<const BoundKernel*>(self);
    std::apply(b->kernel, b->params);
  }
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const PendingLaunch<Args...>& pending) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  BoundKernel<Params...> bound{kernel, std::apply(
                                           [](const auto&... a) {
                                             return std::tuple<std::decay_t<Params>...>(a...);
                                           },
                                           pending.args)};
  // Kernels with internal linkage have no dynamic symbol: name them by launch site.
  std::string name = kernel_display_name(reinterpret_cast<const void*>(kernel));
  if (name.empty()) name = std::string("kernel launched at ") + pending.file + ":" + std::to_string(pending.line);
  LaunchSpec spec;
  spec.grid = pending.grid;
  spec.block = pending.block;
  spec.dynamic_smem = pending.smem;
  spec.kernel_name = name.c_str();
  spec.kernel_id = reinterpret_cast<const void*>(kernel);
  run_grid(spec, &BoundKernel<Params...>::run, &bound);
}

}  // namespace emu
}  // namespace tfkernels

// `kernel / LaunchConfig(__FILE__, __LINE__, grid, block, smem, stream)(args...)`: the rewritten form
// of `kernel<<<grid, block, smem, stream>>>(args...)`.
template <typename... Params, typename... Args>
void operator/(void (*kernel)(Params...), const ::tfkernels::emu::PendingLaunch<Args...>& pending) {
  ::tfkernels::emu::launch(kernel, pending);
}

// Shared memory declarations, rewritten at build time:
//   extern __shared__ T name[];   ->  T* const name = TFK_EMU_DYNAMIC_SMEM(T);
//   __shared__ T name[A][B];      ->  auto& name = TFK_EMU_STATIC_SMEM(align, T[A][B]);
// Every declaration site (and template instantiation) gets its own slot, keyed by
// the address of a static local of a lambda unique to the expansion.
#define TFK_EMU_DYNAMIC_SMEM(T) reinterpret_cast<T*>(::tfkernels::emu::dynamic_smem())
#define TFK_EMU_STATIC_SMEM(align, ...)                                                                   \
  (*static_cast<std::add_pointer_t<__VA_ARGS__>>(::tfkernels::emu::static_smem(                                              \
      [] { static char site; return static_cast<const void*>(&site); }(), sizeof(__VA_ARGS__), (align))))

inline uint32_t __cvta_generic_to_shared(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::tfkernels::emu::dynamic_smem());
}
