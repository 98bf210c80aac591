// GroupNorm (+SiLU) forward: host-side interface of the CUDA kernels.
//
// Plain CUDA, no torch headers: this file is included both by group_norm.cu
// (compiled by nvcc alone, see scripts/compile_cuda.sh) and by the torch
// binding group_norm_binding.cpp, which turns tensors into a ForwardArgs and a
// returned cudaError_t into a readable error.
//
// The input is viewed as x[n, c, s] with s the flattened spatial index
// (up to 3 spatial dims, padded with leading size-1 dims). Any strides work;
// the fast paths need one of two layouts for both x and y:
//   * spatial-inner ("NCHW"): the spatial dims collapse to one unit-stride dim;
//   * channels-inner ("NHWC", channels_last): channel stride 1, spatial dims
//     collapse to one dim of stride >= C.
// Everything else (e.g. a slice with a step) runs the scalar strided path.
// An optional input_bias (N, C) is added to x on load, before the statistics,
// rounded to x's dtype: the kernels normalise x + input_bias[:, :, None, None]
// exactly as PyTorch would compute that sum (the time embedding of a ResNet
// block, fused into its GroupNorm).
// Channels-inner tensors whose groups are too narrow for 16-byte packs but
// whose channel rows are not take the rows path (Algorithm::kRows).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastdiff {
namespace group_norm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxSpatialDims = 3;

// Strides, in elements, of one (N, C, *spatial) tensor.
struct TensorStrides {
  int64_t n;
  int64_t c;
  int64_t spatial[kMaxSpatialDims];  // padded in front with 0 for missing dims
};

struct ForwardArgs {
  DType dtype;
  int64_t batch;                             // N
  int64_t channels;                          // C
  int64_t groups;                            // G, divides C
  int64_t spatial_sizes[kMaxSpatialDims];    // padded in front with 1s
  const void* x;                             // input, dtype `dtype`
  TensorStrides x_strides;
  void* y;                                   // output, dtype `dtype`, same sizes as x
  TensorStrides y_strides;
  const void* weight;                        // (C,) contiguous, dtype `dtype`
  const void* bias;                          // (C,) contiguous, dtype `dtype`
  const void* input_bias;                    // (N, C) contiguous, dtype `dtype`, or null: added to x
                                             // (rounded to `dtype`) before the statistics
  float* mean;                               // (N, G) contiguous fp32 output
  float* rstd;                               // (N, G) contiguous fp32 output: 1/sqrt(var + eps)
  float eps;
  bool silu;                                 // apply y = z * sigmoid(z) after the affine
};

// How a forward call is launched; chosen by make_plan (the launch heuristics,
// documented in group_norm.cu, live there and nowhere else).
enum class Algorithm : int {
  kOnePass = 0,  // one CTA per (n, group): x read once into shared memory, 1 read + 1 write
  kTwoPass = 1,  // `splits` CTAs per (n, group): partial stats, then combine + normalise
  kRows = 2,     // channels-inner with narrow groups: `splits` CTAs per sample, each owning
                 // whole channel rows; partial stats (the last CTA of each sample to finish
                 // merges them), then normalise (two launches)
};

struct Plan {
  Algorithm algorithm;
  int splits;               // CTAs per (n, group)
  int vec;                  // elements per load/store (1 = scalar strided path)
  bool channels_inner;      // iterate channels fastest (NHWC) rather than spatial (NCHW)
  int threads;              // threads per CTA (rows path: a multiple of C / vec, not always of 32)
  size_t shared_bytes;      // dynamic shared memory of the one-pass kernel
  size_t workspace_bytes;   // global scratch the caller must provide (two-pass partial stats)
  int64_t counters;         // int32 counters the caller must provide, zeroed (rows path: one per
                            // sample); forward() leaves them zeroed, so zero them once and reuse them
                            // for every call on the same stream (and in CUDA graph replays)
  int launches;             // kernel launches forward() makes (nothing else: no memset, no copy)
  size_t tile_bytes;        // bytes one CTA loads per loop trip (kUnroll packs per thread)
};

// Validates `args` and picks the launch configuration for a device with
// `sm_count` SMs. Returns cudaErrorInvalidValue (and leaves `plan` unset) when
// the arguments are inconsistent; the binding checks them first with clearer
// messages, so this is a second line of defence.
cudaError_t make_plan(const ForwardArgs& args, int sm_count, Plan* plan);

// Launches the forward on `stream`. `workspace` must hold plan.workspace_bytes
// bytes (it may be null when that is 0) and be 16-byte aligned; `counters`
// must hold plan.counters zeroed int32s (null when that is 0), which no other
// stream uses at the same time. Returns the launch error, if any; it does not
// synchronise.
cudaError_t forward(const ForwardArgs& args, const Plan& plan, void* workspace, int* counters, cudaStream_t stream);

}  // namespace group_norm
}  // namespace fastdiff
