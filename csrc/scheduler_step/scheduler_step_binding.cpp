// Torch binding of the CUDA fused scheduler step: registers
//   fastdiff::scheduler_step_cuda(Tensor sample, Tensor model_output, Tensor coeffs, Tensor(a!) step_index,
//                                 Tensor(b!) out, Tensor? noise, Tensor(c!)? history, float? guidance_scale,
//                                 Tensor? guidance_tensor, bool has_guidance, bool advance_step_index) -> ()
// with a CUDA implementation. It writes `out` (and the history slot, and advances
// `step_index` when asked) in place and returns nothing, like the Triton op of
// fastdiff/ops/scheduler_step.py, which validates the inputs, documents the
// conventions and gives this op its fake implementation. The schema lives in a
// TORCH_LIBRARY_FRAGMENT because Python registers other ops in `fastdiff`.
//
// The kernel (scheduler_step.cu) needs every sample-shaped view dense with the
// sample's strides; the checks below repeat the op's checks with TORCH_CHECK
// messages, so a direct call cannot launch on bad arguments.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "scheduler_step.h"

namespace fastdiff {
namespace scheduler_step {
namespace {

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "scheduler_step_cuda: sample must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// `view` (a sample-shaped view of `name`) must live with the sample and share its dense layout.
void check_view(const at::Tensor& view, const at::Tensor& sample, const char* name) {
  TORCH_CHECK(view.device() == sample.device(), "scheduler_step_cuda: ", name, " is on ", view.device(),
              " but sample is on ", sample.device());
  TORCH_CHECK(view.scalar_type() == sample.scalar_type(), "scheduler_step_cuda: ", name, " dtype ", view.scalar_type(),
              " does not match sample's dtype ", sample.scalar_type());
  TORCH_CHECK(view.sizes() == sample.sizes() && view.strides() == sample.strides(), "scheduler_step_cuda: ", name,
              " must be dense with sample's sizes ", sample.sizes(), " and strides ", sample.strides(), ", got sizes ",
              view.sizes(), " and strides ", view.strides());
}

void scheduler_step_cuda(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coeffs,
                         const at::Tensor& step_index, const at::Tensor& out, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& history, std::optional<double> guidance_scale,
                         const std::optional<at::Tensor>& guidance_tensor, bool has_guidance, bool advance_step_index) {
  TORCH_CHECK(sample.is_cuda(), "scheduler_step_cuda: sample must be a CUDA tensor, got ", sample.device());
  TORCH_CHECK(sample.dim() >= 1 && sample.numel() > 0 && sample.numel() < (int64_t{1} << 31),
              "scheduler_step_cuda: sample must be a non-empty (B, ...) tensor with fewer than 2^31 elements, got ",
              sample.sizes());
  TORCH_CHECK(sample.is_non_overlapping_and_dense(), "scheduler_step_cuda: sample must be dense, got strides ",
              sample.strides());
  const DType dtype = dtype_of(sample);
  const int64_t batch = sample.size(0);
  TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == (has_guidance ? 2 : 1) * batch,
              "scheduler_step_cuda: model_output must be (", has_guidance ? "2B" : "B", ", ...) for sample ",
              sample.sizes(), ", got ", model_output.sizes());
  check_view(model_output.narrow(0, 0, batch), sample, "model_output");
  check_view(out, sample, "out");
  TORCH_CHECK(coeffs.device() == sample.device() && coeffs.scalar_type() == at::kFloat && coeffs.dim() == 2 &&
                  coeffs.size(0) > 0 && coeffs.size(1) == kNumCoeffs && coeffs.is_contiguous(),
              "scheduler_step_cuda: coeffs must be a contiguous float32 (num_steps, ", kNumCoeffs, ") table on ",
              sample.device(), ", got ", coeffs.scalar_type(), " ", coeffs.sizes(), " on ", coeffs.device());
  TORCH_CHECK(step_index.device() == sample.device() && step_index.scalar_type() == at::kLong && step_index.numel() == 1,
              "scheduler_step_cuda: step_index must be one int64 on ", sample.device(), ", got ",
              step_index.scalar_type(), " ", step_index.sizes(), " on ", step_index.device());

  StepArgs args{};
  args.dtype = dtype;
  args.n = sample.numel();
  args.x = sample.data_ptr();
  args.model_output = model_output.data_ptr();
  args.cond_offset = has_guidance ? batch * model_output.stride(0) : 0;
  args.has_guidance = has_guidance;
  if (has_guidance) {
    if (guidance_tensor.has_value()) {
      const at::Tensor& g = *guidance_tensor;
      TORCH_CHECK(g.device() == sample.device() && g.scalar_type() == at::kFloat && g.numel() == 1,
                  "scheduler_step_cuda: guidance_tensor must be one float32 on ", sample.device(), ", got ",
                  g.scalar_type(), " ", g.sizes(), " on ", g.device());
      args.guidance_ptr = g.data_ptr<float>();
    } else {
      TORCH_CHECK(guidance_scale.has_value(), "scheduler_step_cuda: has_guidance needs guidance_scale or guidance_tensor");
      args.guidance_scale = static_cast<float>(*guidance_scale);
    }
  }
  if (noise.has_value()) {
    const at::Tensor& nz = *noise;
    const bool bank = nz.dim() == sample.dim() + 1;
    TORCH_CHECK(!bank || nz.size(0) == coeffs.size(0), "scheduler_step_cuda: a noise bank must have num_steps (",
                coeffs.size(0), ") steps, got ", nz.sizes());
    check_view(bank ? nz.select(0, 0) : nz, sample, "noise");
    args.noise = nz.data_ptr();
    args.noise_step_stride = bank ? nz.stride(0) : 0;
  }
  if (history.has_value()) {
    const at::Tensor& ring = *history;
    TORCH_CHECK(ring.dim() == sample.dim() + 1 && ring.size(0) >= 1 && ring.size(0) <= kMaxHistory,
                "scheduler_step_cuda: history must be a (R, *sample.shape) ring with 1 <= R <= ", kMaxHistory, ", got ",
                ring.sizes());
    check_view(ring.select(0, 0), sample, "history");
    args.history = ring.data_ptr();
    args.history_slot_stride = ring.stride(0);
    args.num_history = static_cast<int>(ring.size(0));
  }
  args.out = out.data_ptr();
  args.coeffs = coeffs.data_ptr<float>();
  args.num_steps = coeffs.size(0);
  args.step_index = step_index.data_ptr<int64_t>();
  args.advance = advance_step_index;

  const c10::cuda::CUDAGuard guard(sample.device());
  const cudaError_t status = launch(args, c10::cuda::getCurrentCUDAStream(sample.device().index()).stream());
  TORCH_CHECK(status == cudaSuccess, "scheduler_step_cuda: kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace
}  // namespace scheduler_step
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def(
      "scheduler_step_cuda(Tensor sample, Tensor model_output, Tensor coeffs, Tensor(a!) step_index, Tensor(b!) out,"
      " Tensor? noise, Tensor(c!)? history, float? guidance_scale, Tensor? guidance_tensor, bool has_guidance,"
      " bool advance_step_index) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("scheduler_step_cuda", &fastdiff::scheduler_step::scheduler_step_cuda); }
