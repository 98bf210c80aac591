// Fused scheduler step with classifier-free guidance: one CUDA kernel per step, fp32 / fp16 / bf16.
//
// Plain CUDA with no torch headers: scripts/compile_cuda.sh compiles this file
// with nvcc alone. The torch binding is scheduler_step_binding.cpp; the math and
// the layout contract are in scheduler_step.h.
//
// Index space. All tensors are dense with the sample's strides, so the kernel
// walks element offsets 0..n-1 of every view. Thread t of CTA b owns the pack
// j = b * kThreads + t, i.e. elements [j * VEC, (j + 1) * VEC). VEC is 16 bytes
// of elements (4 fp32, 8 fp16/bf16) when every base pointer and every step/slot
// stride keeps the packs 16-byte aligned, else 1 (the scalar path). The last
// pack may be partial; it is done element by element.
//
// Step index. Thread 0 of each CTA reads the index (with `advance`: one 64-bit
// atomicAdd of 1 << 32 counts the CTA's arrival in the high word and returns the
// index in the low word; the last CTA to arrive adds 1 to the index and clears
// the count), loads the coefficient row into shared memory, and the CTA
// synchronises once. An index outside [0, num_steps) yields NaN coefficients
// and row 0's addresses: NaN output, no out-of-bounds access.
#include "scheduler_step.h"

#include <cuda_runtime.h>

#include "../common/dtype.cuh"

namespace fastdiff {
namespace scheduler_step {
namespace {

// ---------------------------------------------------------------------------
// Launch heuristics: every tuning constant of this op lives here.
// ---------------------------------------------------------------------------

// Latents are 16K-64K elements, so the step is latency-bound: one 16-byte pack
// per thread and small CTAs spread the few thousand threads over more SMs
// (an SD1.5 fp16 latent is 2048 packs = 16 CTAs).
constexpr int kThreads = 128;
constexpr int kPackBytes = 16;

// ---------------------------------------------------------------------------
// Packed loads and stores (fp32 math; from_float rounds stores to nearest even)
// ---------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(in[0]);
  } else {
    Pack<T, VEC> pack;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
  }
}

// ---------------------------------------------------------------------------
// The step
// ---------------------------------------------------------------------------

// What every thread of a CTA needs about the current step, set up by thread 0.
struct StepState {
  float a, e, s, p, q;
  float h[kMaxHistory];
  float g;                       // guidance scale
  int64_t noise_offset;          // elements from noise to this step's noise
  int64_t read_slot[kMaxHistory];  // ring slot of hist[-j - 1]
  int64_t write_slot;            // ring slot that receives d
};

__device__ __forceinline__ void read_step(const StepArgs& args, StepState* st) {
  if (threadIdx.x == 0) {
    int64_t step;
    if (args.advance) {
      auto* word = reinterpret_cast<unsigned long long*>(args.step_index);
      const unsigned long long old = atomicAdd(word, 1ull << 32);
      step = static_cast<int64_t>(old & 0xffffffffull);
      if ((old >> 32) == static_cast<unsigned long long>(gridDim.x) - 1ull) {
        atomicAdd(word, 1ull - (static_cast<unsigned long long>(gridDim.x) << 32));
      }
    } else {
      step = *args.step_index;
    }
    const bool valid = step >= 0 && step < args.num_steps;
    step = valid ? step : 0;
    const float poison = valid ? 0.0f : __int_as_float(0x7fc00000);  // NaN
    const float* row = args.coeffs + step * kNumCoeffs;
    st->a = row[0] + poison;
    st->e = row[1] + poison;
    st->s = row[2] + poison;
    st->p = row[3] + poison;
    st->q = row[4] + poison;
    const int64_t slots = args.num_history;
    for (int j = 0; j < kMaxHistory; ++j) {
      st->h[j] = row[5 + j] + poison;
      st->read_slot[j] = j < slots ? (step + slots - 1 - j) % slots : 0;  // (step - (j + 1)) mod R
    }
    st->write_slot = slots > 0 ? step % slots : 0;
    st->noise_offset = step * args.noise_step_stride;
    st->g = args.guidance_ptr != nullptr ? *args.guidance_ptr : args.guidance_scale;
  }
  __syncthreads();
}

// Update the VEC elements starting at offset i of every view.
template <typename T, int VEC>
__device__ __forceinline__ void step_pack(const StepArgs& args, const StepState& st, int64_t i) {
  float x[VEC], m[VEC], acc[VEC];
  load_pack<T, VEC>(static_cast<const T*>(args.x) + i, x);
  load_pack<T, VEC>(static_cast<const T*>(args.model_output) + i, m);
  if (args.has_guidance) {
    float cond[VEC];
    load_pack<T, VEC>(static_cast<const T*>(args.model_output) + args.cond_offset + i, cond);
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] = m[k] + st.g * (cond[k] - m[k]);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = st.a * x[k] + st.e * m[k];
  if (args.noise != nullptr) {
    float noise[VEC];
    load_pack<T, VEC>(static_cast<const T*>(args.noise) + st.noise_offset + i, noise);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += st.s * noise[k];
  }
  if (args.num_history > 0) {
    T* ring = static_cast<T*>(args.history);
    // Read every slot before writing d: the write may reuse the slot of hist[-R].
#pragma unroll
    for (int j = 0; j < kMaxHistory; ++j) {  // unrolled so st.h and st.read_slot stay in registers
      if (j >= args.num_history) break;
      float hist[VEC];
      load_pack<T, VEC>(ring + st.read_slot[j] * args.history_slot_stride + i, hist);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += st.h[j] * hist[k];
    }
    float d[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) d[k] = st.p * x[k] + st.q * m[k];
    store_pack<T, VEC>(ring + st.write_slot * args.history_slot_stride + i, d);
  }
  store_pack<T, VEC>(static_cast<T*>(args.out) + i, acc);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) scheduler_step_kernel(const StepArgs args) {
  __shared__ StepState st;
  read_step(args, &st);  // every CTA must arrive here (it counts arrivals when advancing)
  const int64_t start = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (start + VEC <= args.n) {
    step_pack<T, VEC>(args, st, start);
  } else {
    for (int64_t i = start; i < args.n; ++i) step_pack<T, 1>(args, st, i);
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0; }

template <typename T>
cudaError_t launch_typed(const StepArgs& args, cudaStream_t stream) {
  constexpr int kVec = kPackBytes / sizeof(T);
  const bool vectorised = aligned(args.x) && aligned(args.out) && aligned(args.model_output) &&
                          (!args.has_guidance || args.cond_offset % kVec == 0) &&
                          (args.noise == nullptr || (aligned(args.noise) && args.noise_step_stride % kVec == 0)) &&
                          (args.history == nullptr || (aligned(args.history) && args.history_slot_stride % kVec == 0));
  const int64_t vec = vectorised ? kVec : 1;
  const int64_t packs = (args.n + vec - 1) / vec;
  const unsigned int blocks = static_cast<unsigned int>((packs + kThreads - 1) / kThreads);
  if (vectorised) {
    scheduler_step_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(args);
  } else {
    scheduler_step_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch(const StepArgs& args, cudaStream_t stream) {
  const bool valid = args.n > 0 && args.n < (int64_t{1} << 31) && args.x != nullptr && args.model_output != nullptr &&
                     args.out != nullptr && args.coeffs != nullptr && args.step_index != nullptr && args.num_steps > 0 &&
                     args.num_history >= 0 && args.num_history <= kMaxHistory &&
                     (args.num_history == 0) == (args.history == nullptr);
  if (!valid) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::kFloat32: return launch_typed<float>(args, stream);
    case DType::kFloat16: return launch_typed<__half>(args, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scheduler_step
}  // namespace fastdiff
