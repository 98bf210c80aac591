// Torch binding of the CUDA GroupNorm forward: registers
//   fastdiff::group_norm_fwd_cuda(Tensor x, Tensor weight, Tensor bias, Tensor? input_bias,
//                                 int num_groups, float eps, str activation)
//     -> (Tensor y, Tensor mean, Tensor rstd)
// with a CUDA implementation. input_bias (N, C), x's dtype, or None: the op
// normalises x + input_bias[:, :, None, None] (the sum rounded to x's dtype, as
// PyTorch computes it), and mean / rstd are the statistics of that sum. The schema lives in a TORCH_LIBRARY_FRAGMENT
// because Python (fastdiff/ops/group_norm.py) registers other ops in the same
// `fastdiff` namespace, and gives this op its fake (meta) implementation and
// autograd formula.
//
// y = torch::empty_like(x), so it keeps x's memory format (contiguous or
// channels_last); mean and rstd are fp32 (N, G). The kernels (group_norm.cu)
// take any strides; see group_norm.h for which layouts get the vectorised path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "group_norm.h"

namespace fastdiff {
namespace group_norm {
namespace {

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "group_norm_fwd_cuda: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// Strides of an (N, C, *spatial) tensor, spatial dims padded in front to 3.
TensorStrides strides_of(const at::Tensor& t) {
  TensorStrides s{};
  s.n = t.stride(0);
  s.c = t.stride(1);
  const int64_t spatial_dims = t.dim() - 2;
  for (int d = 0; d < kMaxSpatialDims; ++d) {
    const int64_t src = d - (kMaxSpatialDims - spatial_dims);
    s.spatial[d] = src >= 0 ? t.stride(2 + src) : 0;
  }
  return s;
}

// SM count of `device`, queried once per device (it sizes the grid).
int sm_count_of(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) >= cache.size()) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    const cudaError_t status = cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device);
    TORCH_CHECK(status == cudaSuccess, "group_norm_fwd_cuda: cannot query the SM count: ", cudaGetErrorString(status));
  }
  return cache[device];
}

// The rows path's counters (Plan::counters): int32 zeros that every launch
// leaves zeroed (the last CTA of each sample resets its own), so a set is
// zeroed once and then reused with no memset per call. One set per
// (device, stream), so that launches running at the same time on different
// streams never share one. While `stream` is capturing a CUDA graph, one set
// per capture: its zeroing (at::zeros) is captured into that graph, which
// zeroes it at every replay, and nothing zeroes it outside the graph (a
// capture executes nothing), so eager calls never use it. Sets are never
// freed: a graph keeps the address of its set, and a set outgrown by a larger
// batch may still be in use by kernels in flight.
int* zeroed_counters(const at::Tensor& x, int64_t count, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  const cudaError_t status = cudaStreamGetCaptureInfo(stream, &capture, &capture_id);
  TORCH_CHECK(status == cudaSuccess, "group_norm_fwd_cuda: cannot query the stream's capture status: ",
              cudaGetErrorString(status));
  if (capture != cudaStreamCaptureStatusActive) capture_id = 0;
  static std::mutex mutex;
  static std::map<std::tuple<int, cudaStream_t, unsigned long long>, at::Tensor> sets;
  static std::vector<at::Tensor> outgrown;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& set = sets[std::make_tuple(static_cast<int>(x.device().index()), stream, capture_id)];
  if (!set.defined() || set.numel() < count) {
    if (set.defined()) outgrown.push_back(set);
    set = at::zeros({std::max<int64_t>(count, 64)}, x.options().dtype(at::kInt));  // on the current stream, = stream
  }
  return set.data_ptr<int>();
}

void check_param(const at::Tensor& p, const char* name, const at::Tensor& x) {
  TORCH_CHECK(p.device() == x.device(), "group_norm_fwd_cuda: ", name, " is on ", p.device(), " but x is on ", x.device());
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), "group_norm_fwd_cuda: ", name, " dtype ", p.scalar_type(),
              " does not match x's dtype ", x.scalar_type());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), "group_norm_fwd_cuda: ", name, " must have shape (", x.size(1),
              ",) to match x's channels, got ", p.sizes());
}

// input_bias must be (N, C) in x's dtype on x's device. Returned contiguous and
// 16-byte aligned (copied when it is not), because channels-inner kernels load
// input_bias[n, c:c + 8] as one 16-byte pack.
at::Tensor checked_input_bias(const at::Tensor& input_bias, const at::Tensor& x) {
  TORCH_CHECK(input_bias.device() == x.device(), "group_norm_fwd_cuda: input_bias is on ", input_bias.device(),
              " but x is on ", x.device());
  TORCH_CHECK(input_bias.scalar_type() == x.scalar_type(), "group_norm_fwd_cuda: input_bias dtype ",
              input_bias.scalar_type(), " does not match x's dtype ", x.scalar_type());
  TORCH_CHECK(input_bias.dim() == 2 && input_bias.size(0) == x.size(0) && input_bias.size(1) == x.size(1),
              "group_norm_fwd_cuda: input_bias must have shape (N, C) = (", x.size(0), ", ", x.size(1),
              ") to match x, got ", input_bias.sizes());
  at::Tensor ib = input_bias.contiguous();
  if (reinterpret_cast<uintptr_t>(ib.data_ptr()) % 16 != 0) ib = ib.clone();
  return ib;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias,
                                                                   const std::optional<at::Tensor>& input_bias,
                                                                   int64_t num_groups, double eps,
                                                                   c10::string_view activation) {
  TORCH_CHECK(x.is_cuda(), "group_norm_fwd_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 2 + kMaxSpatialDims,
              "group_norm_fwd_cuda: x must have shape (N, C, *spatial) with 1 to 3 spatial dims, got ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "group_norm_fwd_cuda: x is empty (shape ", x.sizes(), ")");
  const DType dtype = dtype_of(x);
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, "group_norm_fwd_cuda: num_groups (", num_groups,
              ") must be positive and divide the channel count of x (", x.size(1), ")");
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  const at::Tensor ib = input_bias.has_value() ? checked_input_bias(*input_bias, x) : at::Tensor();
  TORCH_CHECK(eps >= 0, "group_norm_fwd_cuda: eps must be non-negative, got ", eps);
  const std::string act(activation.data(), activation.size());
  TORCH_CHECK(act == "none" || act == "silu", "group_norm_fwd_cuda: activation must be 'none' or 'silu', got '", act, "'");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0), num_groups}, x.options().dtype(at::kFloat));

  ForwardArgs args{};
  args.dtype = dtype;
  args.batch = x.size(0);
  args.channels = x.size(1);
  args.groups = num_groups;
  const int64_t spatial_dims = x.dim() - 2;
  for (int d = 0; d < kMaxSpatialDims; ++d) {
    const int64_t src = d - (kMaxSpatialDims - spatial_dims);
    args.spatial_sizes[d] = src >= 0 ? x.size(2 + src) : 1;
  }
  args.x = x.data_ptr();
  args.x_strides = strides_of(x);
  args.y = y.data_ptr();
  args.y_strides = strides_of(y);
  args.weight = w.data_ptr();
  args.bias = b.data_ptr();
  args.input_bias = ib.defined() ? ib.data_ptr() : nullptr;
  args.mean = mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.eps = static_cast<float>(eps);
  args.silu = act == "silu";

  const int sm_count = sm_count_of(x.device().index());
  Plan plan{};
  const cudaError_t plan_status = make_plan(args, sm_count, &plan);
  TORCH_CHECK(plan_status == cudaSuccess, "group_norm_fwd_cuda: the kernel rejected the arguments (x shape ", x.sizes(),
              ", strides ", x.strides(), ", num_groups ", num_groups,
              "); a group (C / num_groups * spatial size) may hold at most 2^30 elements and N * num_groups must be below 2^31");
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  int* counters = plan.counters > 0 ? zeroed_counters(x, plan.counters, stream) : nullptr;
  const cudaError_t status = forward(args, plan, plan.workspace_bytes > 0 ? workspace.data_ptr() : nullptr, counters, stream);
  TORCH_CHECK(status == cudaSuccess, "group_norm_fwd_cuda: kernel launch failed: ", cudaGetErrorString(status));
  return {y, mean, rstd};
}

}  // namespace
}  // namespace group_norm
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def(
      "group_norm_fwd_cuda(Tensor x, Tensor weight, Tensor bias, Tensor? input_bias, int num_groups, float eps,"
      " str activation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm_fwd_cuda", &fastdiff::group_norm::group_norm_fwd_cuda); }
