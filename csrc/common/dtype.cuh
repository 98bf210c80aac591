// Device helpers shared by the csrc/ kernels: fp32 conversions of the three
// element types and the pack moved by one vectorised load or store.
//
// Plain CUDA, no torch headers. Included by the .cu files as
// "../common/dtype.cuh", which resolves from the including file's folder, so
// it needs no extra include path (the GroupNorm CPU emulator in
// tests/test_group_norm_cuda.py adds only csrc/group_norm).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastdiff {

// Kernels compute in fp32; to_float widens a loaded element, from_float rounds
// a result to nearest even when it narrows.
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved by one load or store instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

}  // namespace fastdiff
