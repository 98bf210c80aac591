// Fused scheduler step with classifier-free guidance: host-side interface of the CUDA kernel.
//
// Plain CUDA, no torch headers: included by scheduler_step.cu (compiled by nvcc
// alone, see scripts/compile_cuda.sh) and by the torch binding
// scheduler_step_binding.cpp, which fills StepArgs from tensors.
//
// Per element, in fp32, with the coefficient row coeffs[step] (a, e, s, p, q, h1, h2, h3):
//   m      = u + g * (c - u)        (u, c: uncond and cond halves; m = model output without guidance)
//   x_prev = a*x + e*m + s*noise + h1*hist[-1] + h2*hist[-2] + h3*hist[-3]
//   hist[step mod R] <- p*x + q*m   (when a history ring is given)
// The conventions (history ring, noise bank, step index) are documented in
// fastdiff/ops/scheduler_step.py.
//
// Layout: every tensor is dense (non-overlapping, no gaps) with the sample's
// strides, so element i of every view sits at offset i from its base pointer
// and the kernel walks memory linearly. Strided views run on the Triton kernel.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastdiff {
namespace scheduler_step {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kNumCoeffs = 8;   // columns of the coefficient table
constexpr int kMaxHistory = 3;  // slots of the history ring

struct StepArgs {
  DType dtype;                  // of x, model_output, noise, history and out
  int64_t n;                    // elements of the sample (< 2^31)
  const void* x;                // sample
  const void* model_output;     // model output, or with guidance its uncond half (the first B rows)
  int64_t cond_offset;          // elements from the uncond half to the cond half (B * stride(0))
  bool has_guidance;
  float guidance_scale;         // used when has_guidance and guidance_ptr is null
  const float* guidance_ptr;    // optional one-element fp32 device tensor holding the scale
  const void* noise;            // null, one step's noise, or step 0 of a (num_steps, ...) bank
  int64_t noise_step_stride;    // elements between two steps of the bank; 0 for one step's noise
  void* history;                // null, or slot 0 of the (R, ...) ring
  int64_t history_slot_stride;  // elements between two slots
  int num_history;              // R, 0..kMaxHistory
  void* out;                    // x_prev; may equal x
  const float* coeffs;          // (num_steps, kNumCoeffs) fp32, row-major contiguous
  int64_t num_steps;
  int64_t* step_index;          // one int64 on the device
  bool advance;                 // add 1 to *step_index in this launch
};

// Launches the single kernel on `stream`. Returns cudaErrorInvalidValue for
// inconsistent arguments (the binding checks them first with clearer messages),
// else the launch error, if any. It does not synchronise and never reads device
// memory on the host, so it can be captured in a CUDA graph.
cudaError_t launch(const StepArgs& args, cudaStream_t stream);

}  // namespace scheduler_step
}  // namespace fastdiff
