// Shared by the CUDA kernels of RTD, linear-CE and the test hooks: dtype conversion, vector loads,
// deterministic warp / block reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "pyobjectives/params.h"

namespace pyobjectives::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) with T the element type of dt.
template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(Tag<float>{}); break;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat16: f(Tag<__half>{}); break;
  }
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Eight consecutive elements in 16-byte transactions (8-byte for 1-byte types); p must be aligned to
// the load width.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, T (&out)[8]) {
  if constexpr (sizeof(T) * 8 >= 16) {
    constexpr int kLoads = sizeof(T) * 8 / 16;
    uint4 raw[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) raw[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    memcpy(out, raw, sizeof(out));
  } else {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(out, &raw, sizeof(out));
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const T (&in)[8]) {
  if constexpr (sizeof(T) * 8 >= 16) {
    constexpr int kStores = sizeof(T) * 8 / 16;
    uint4 raw[kStores];
    memcpy(raw, in, sizeof(in));
#pragma unroll
    for (int i = 0; i < kStores; ++i) reinterpret_cast<uint4*>(p)[i] = raw[i];
  } else {
    uint2 raw;
    memcpy(&raw, in, sizeof(in));
    *reinterpret_cast<uint2*>(p) = raw;
  }
}

// Butterfly sum: a fixed order, and every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace pyobjectives::cuda
