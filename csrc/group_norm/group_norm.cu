// GroupNorm (+SiLU) forward kernels for fp32 / fp16 / bf16, NCHW and NHWC.
//
// Plain CUDA with no torch headers: scripts/compile_cuda.sh compiles this file
// with nvcc alone. The torch binding is group_norm_binding.cpp.
//
// Math, per sample n and group g (cpg = C / G channels, S spatial positions):
//   x'[c, s]  = x[c, s] + input_bias[n, c], rounded to x's dtype  (x' = x without input_bias)
//   mean, var = moments of the cpg * S values of x'[n, group g]  (fp32, biased var)
//   rstd      = 1 / sqrt(var + eps)
//   z[c, s]   = (x'[c, s] - mean) * (rstd * w[c]) + b[c]
//   y[c, s]   = z * sigmoid(z) if silu else z
// Statistics are accumulated with Welford's update per loaded pack and merged
// across threads, warps and CTAs with Chan et al.'s pairwise formula, means and
// M2 in fp32, counts in int32 (exact: a group holds up to 2^30 values, and an
// fp32 count would round past 2^24, e.g. a VAE group at 2048x2048); the output
// is rounded once to x's dtype.
//
// Index space. Each (n, g) group is viewed as a 2-D array [outer][inner] whose
// inner dimension has unit stride on the fast paths:
//   spatial-inner (NCHW):  outer = channel of the group (cpg), inner = spatial (S)
//   channels-inner (NHWC): outer = spatial (S), inner = channel of the group (cpg)
// Loads and stores move "packs" of VEC consecutive inner elements (16 bytes
// when the sizes, strides and pointer alignment allow it; see analyse_layout). A
// group holds group_packs = outer * inner / VEC packs, numbered j = o * (inner /
// VEC) + i, and a CTA owns a contiguous range of j. VEC == 1 is the scalar
// fallback and takes arbitrary strides (up to 3 spatial dims, not collapsed).
//
// Algorithms (chosen by make_plan, the one place holding launch heuristics):
//   one-pass: grid (N*G); a CTA loads its whole group into shared memory while
//             accumulating the moments, reduces them, then normalises from
//             shared memory. Traffic: 1 read + 1 write of x.
//   two-pass: grid (N*G, splits); _stats_kernel writes one partial (n, mean,
//             M2) per CTA, then _apply_kernel has every CTA merge the `splits`
//             partials of its group (a few hundred bytes) and normalise its
//             range. Traffic: 2 reads + 1 write of x (the second read often
//             hits L2). Splitting over the group gives a full wave at Stable
//             Diffusion shapes, where N*G is only 64 at batch 2.
//   rows:     channels-inner layouts whose group runs are narrow (packs under
//             16 bytes, or runs under kRowsMinGroupRunBytes; e.g. NHWC with 10
//             or 20 channels per group, as in SD 1.5) when two passes are
//             needed anyway: grid (N, splits), a CTA owns whole rows of all C
//             channels. Same traffic and launches as two-pass: the last CTA of
//             each sample to finish its statistics merges the sample's
//             partials (see "Rows path").
// Launches: one-pass 1, two-pass 2, rows 2.
#include "group_norm.h"

#include <cuda_runtime.h>

#include "../common/dtype.cuh"

namespace fastdiff {
namespace group_norm {
namespace {

// ---------------------------------------------------------------------------
// Launch heuristics: every tuning constant of this op lives here.
// ---------------------------------------------------------------------------

constexpr int kThreads = 256;                      // threads per CTA, all kernels
// Every kernel is declared __launch_bounds__(kThreads, 1): with an explicit
// minimum of 1 CTA per SM, ptxas (CUDA 13.0) keeps values in registers
// instead of spilling 2-20 bytes per thread to fit 4-5 CTAs per SM, which it
// did with __launch_bounds__(kThreads) alone (in the strided kernels, and in
// the input_bias variants of vectorised ones). No kernel spills now; they use
// at most 99 registers, i.e. >= 2 resident CTAs (>= 32 KB of loads in flight)
// per SM on sm_80 and sm_90.
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                         // packs in flight per thread per loop trip
constexpr int kTargetCtasPerSm = 4;                // two-pass: aim for this many CTAs per SM
constexpr int64_t kMinElemsPerCta = 2048;          // ... but give each CTA at least this much work
constexpr int kMaxSplits = 256;                    // partials merged per group in _apply_kernel
constexpr int64_t kRowsMinElemsPerCta = 8192;      // rows path: its CTAs also merge per-group partials in shared memory
constexpr int64_t kRowsMinGroupRunBytes = 64;      // NHWC groups narrower than this take the rows path (two sectors)
// Largest group cached on chip by the one-pass kernel. Static plus dynamic
// shared memory must stay within 48 KiB to launch without an opt-in attribute;
// the reductions' static arrays take ~128 bytes, so leave 4 KiB of headroom.
constexpr size_t kOnePassSharedBytes = 44 * 1024;
constexpr int64_t kMaxGroupElems = int64_t{1} << 30;  // 32-bit pack indices, with headroom for the loop's overshoot
// Bytes a CTA loads per loop trip with 16-byte packs (kUnroll packs per
// thread, all issued before any is used): 16 KB, so that kTargetCtasPerSm
// CTAs keep 32-64 KB in flight per SM on VAE-sized tensors, well above what
// an H100's ~3.3 TB/s needs (~15 KB per SM at ~600 ns latency). The rows
// path uses whole rows per trip: 129-256 threads, i.e. 8-16 KB.
constexpr int kTileBytes = kThreads * kUnroll * 16;
static_assert(kTileBytes >= 8 * 1024 && kTileBytes <= 16 * 1024, "a CTA's loop trip should move 8-16 KB");
static_assert(kThreads % 64 == 0, "the rows path's last CTA needs a full warp (blockDim.x > kThreads / 2 >= 32)");
//
// What these give on an H100 (132 SMs) for Stable Diffusion at batch 2 (N*G = 64), fp16
// (tests/test_group_norm_cuda.py::test_plan_fills_an_h100_on_sd_shapes checks them):
//   NCHW (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), VAE: two-pass, 5-9 splits, 320-576 CTAs;
//   NHWC with 10 / 16 / 20 channels per group (UNet 320 / 640, VAE 512): rows path, 160-512 CTAs, 2 launches;
//   NHWC (2, 1280, 16, 16): two-pass, 320 CTAs;
//   (2, 1280, 8, 8): 2560-element groups, one-pass with 64 CTAs. Below one wave, on purpose:
//   the whole tensor is 320 KB, so the launch, not bandwidth, is the cost, and a
//   second launch would cost more than the idle SMs.
// Untuned: set by reasoning, not measured. benchmarks/bench_group_norm.py on a GPU is the judge.

// ---------------------------------------------------------------------------
// Geometry: where element (n, c, s) of x and y lives. Passed by value.
// ---------------------------------------------------------------------------

struct Strides {
  int64_t n, c, s0, s1, s2;  // elements; on the fast paths s0 = s1 = 0 and s2 is the collapsed spatial stride
};

struct Geometry {
  int64_t groups;       // G
  int64_t cpg;          // channels per group
  int inner_packs;      // inner extent / VEC
  int group_packs;      // packs per (n, g) group = outer * inner_packs (< 2^31, checked by valid())
  int64_t d1, d2;       // sizes of spatial dims 1 and 2 (strided path only)
  Strides x, y;
};

// Offset of element (n, c, s) of a tensor with strides `st`. The fast paths
// (VEC > 1) have collapsed spatial dims; the scalar path splits s into 3 dims.
template <bool kStrided>
__device__ __forceinline__ int64_t element_offset(const Strides& st, const Geometry& geo, int64_t n, int64_t c, int64_t s) {
  if constexpr (kStrided) {
    const int64_t s2 = s % geo.d2;
    const int64_t rest = s / geo.d2;
    const int64_t s1 = rest % geo.d1;
    const int64_t s0 = rest / geo.d1;
    return n * st.n + c * st.c + s0 * st.s0 + s1 * st.s1 + s2 * st.s2;
  } else {
    return n * st.n + c * st.c + s * st.s2;
  }
}

// Pack (o, i) of group g: its first channel and its spatial position.
template <int VEC, bool kChannelsInner>
__device__ __forceinline__ void pack_position(const Geometry& geo, int64_t g, int o, int i, int64_t* c, int64_t* s) {
  if constexpr (kChannelsInner) {
    *c = g * geo.cpg + static_cast<int64_t>(i) * VEC;
    *s = o;
  } else {
    *c = g * geo.cpg + o;
    *s = static_cast<int64_t>(i) * VEC;
  }
}

// Calls use(load(o, i, j), o, i, j) for every pack j in [j0, j1) owned by this
// thread (j = j0 + threadIdx.x + k * kThreads), with o = j / inner_packs and
// i = j % inner_packs tracked incrementally (one division per thread, not per
// pack). kUnroll loads are issued before any is used, to keep memory busy.
template <typename Load, typename Use>
__device__ __forceinline__ void for_each_pack(int j0, int j1, int inner_packs, Load load, Use use) {
  int j = j0 + static_cast<int>(threadIdx.x);
  if (j >= j1) return;
  int o = j / inner_packs;
  int i = j - o * inner_packs;
  const int step_o = kThreads / inner_packs;
  const int step_i = kThreads - step_o * inner_packs;
  using PackT = decltype(load(o, i, j));
  while (j < j1) {
    PackT packs[kUnroll];
    int os[kUnroll], is[kUnroll], js[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      js[u] = j;
      os[u] = o;
      is[u] = i;
      if (j < j1) packs[u] = load(o, i, j);
      j += kThreads;
      o += step_o;
      i += step_i;  // step_i < inner_packs, so one wrap at most
      if (i >= inner_packs) {
        i -= inner_packs;
        ++o;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (js[u] < j1) use(packs[u], os[u], is[u], js[u]);
    }
  }
}

// ---------------------------------------------------------------------------
// Moments: Welford within a pack, Chan's merge everywhere else.
// ---------------------------------------------------------------------------

// Also the layout of the partials in the two-pass and rows workspaces (12 bytes).
struct Moments {
  int32_t n;   // number of values: exact, never an fp32 count (which stops at 2^24)
  float mean;  // their mean
  float m2;    // sum of squared deviations from the mean
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  // Chan, Golub & LeVeque: combine two disjoint sets' (n, mean, M2). The
  // count adds exactly; only the weight b.n / n is rounded (to fp32).
  const int32_t n = a.n + b.n;
  if (n == 0) return a;
  const float wb = static_cast<float>(b.n) / static_cast<float>(n);
  const float d = b.mean - a.mean;
  return Moments{n, a.mean + d * wb, a.m2 + b.m2 + d * d * static_cast<float>(a.n) * wb};
}

template <typename T, int VEC>
__device__ __forceinline__ Moments pack_moments(const Pack<T, VEC>& p) {
  float v[VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    v[k] = to_float(p.v[k]);
    sum += v[k];
  }
  const float mean = sum * (1.f / VEC);
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) m2 += (v[k] - mean) * (v[k] - mean);
  return Moments{VEC, mean, m2};
}

__device__ __forceinline__ Moments warp_reduce(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Moments other;
    other.n = __shfl_down_sync(0xffffffffu, m.n, offset);
    other.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    other.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    m = merge(m, other);
  }
  return m;  // complete in lane 0
}

// Every thread of the CTA gets the merged moments of the whole CTA.
__device__ __forceinline__ Moments block_reduce(Moments m) {
  __shared__ Moments per_warp[kWarps];
  __shared__ Moments total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  m = warp_reduce(m);
  if (lane == 0) per_warp[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? per_warp[lane] : Moments{0, 0.f, 0.f};
    m = warp_reduce(m);
    if (lane == 0) total = m;
  }
  __syncthreads();
  return total;
}

// Called by all 32 lanes of a warp: merges the `splits` partials of group ng,
// stored at partials[ng * splits + k], in a fixed order. The result is
// complete in lane 0. Loads bypass L1 (__ldcg): other CTAs of the same launch
// may have written them (the rows path's last-arriving CTA).
__device__ __forceinline__ Moments merge_partials_in_warp(const Moments* partials, int64_t ng, int64_t splits) {
  Moments m{0, 0.f, 0.f};
#pragma unroll 4  // independent loads in flight; the merges stay in k order
  for (int64_t k = threadIdx.x & 31; k < splits; k += 32) {
    const Moments* p = partials + ng * splits + k;
    m = merge(m, Moments{__ldcg(&p->n), __ldcg(&p->mean), __ldcg(&p->m2)});
  }
  return warp_reduce(m);
}

__device__ __forceinline__ float rstd_of(const Moments& m, float eps) {
  return rsqrtf(fmaxf(m.m2 / static_cast<float>(m.n), 0.f) + eps);
}

// Element-wise p + b, rounded to T (see add_input_bias).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> add_packs(Pack<T, VEC> p, const Pack<T, VEC>& b) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(to_float(p.v[k]) + to_float(b.v[k]));
  return p;
}

// x + input_bias for the pack whose first channel is c (input_bias already
// offset to this sample's row), rounded to T: in fp32 the sum of two fp16 or
// bf16 values rounds once more to T exactly as PyTorch's own x + input_bias
// does (24 >= 2 * 11 + 2 bits, so the double rounding is innocuous).
// Spatial-inner packs share channel c; channels-inner packs span channels
// [c, c + VEC), loaded as one aligned pack (analyse_layout checks the pointer).
// kInputBias is a template parameter of every kernel, so that calls without
// input_bias run exactly the code (and registers) they ran before it existed.
template <bool kInputBias, typename T, int VEC, bool kChannelsInner>
__device__ __forceinline__ Pack<T, VEC> add_input_bias(Pack<T, VEC> p, const T* __restrict__ input_bias, int64_t c) {
  if constexpr (!kInputBias) {
    return p;
  } else if constexpr (kChannelsInner) {
    return add_packs(p, *reinterpret_cast<const Pack<T, VEC>*>(input_bias + c));
  } else {
    const float b = to_float(input_bias[c]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = from_float<T>(to_float(p.v[k]) + b);
    return p;
  }
}

// Normalises one pack with the group's mean and rstd, applies the affine and
// optionally SiLU, and returns it in T.
template <typename T, int VEC, bool kChannelsInner>
__device__ __forceinline__ Pack<T, VEC> normalize_pack(const Pack<T, VEC>& p, int64_t c, float mean, float rstd,
                                                       const T* __restrict__ weight, const T* __restrict__ bias, bool silu) {
  Pack<T, VEC> out;
  // Spatial-inner packs share one channel; channels-inner packs span VEC channels.
  float scale = 0.f, shift = 0.f;
  if constexpr (!kChannelsInner) {
    scale = rstd * to_float(weight[c]);
    shift = to_float(bias[c]);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if constexpr (kChannelsInner) {
      scale = rstd * to_float(weight[c + k]);
      shift = to_float(bias[c + k]);
    }
    float z = (to_float(p.v[k]) - mean) * scale + shift;
    if (silu) z = z / (1.f + __expf(-z));  // SiLU: z * sigmoid(z)
    out.v[k] = from_float<T>(z);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Kernels. Program-id mapping, all three:
//   blockIdx.x = n * G + g   (one (sample, group) pair; up to 2^31 - 1 of them)
//   blockIdx.y = split k     (two-pass only: packs [k * P / splits, (k + 1) * P / splits)
//                             of the group's P = group_packs packs)
// The apply kernels walk the grid backwards (last CTA first): the stats kernel
// read the tail of x last, so that part is still in L2 when the apply kernel
// starts, which saves DRAM reads on tensors a little larger than L2.
// ---------------------------------------------------------------------------

__device__ __forceinline__ int64_t reversed_block_x() { return static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x; }
__device__ __forceinline__ int64_t reversed_block_y() { return static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y; }

// One-pass: the whole group is cached in dynamic shared memory (group_packs packs).
template <typename T, int VEC, bool kChannelsInner, bool kInputBias>
__global__ void __launch_bounds__(kThreads, 1) _one_pass_kernel(
    const T* __restrict__ x,       // input, element (n, c, s) at element_offset(geo.x, ...)
    T* __restrict__ y,             // output, element (n, c, s) at element_offset(geo.y, ...)
    const T* __restrict__ weight,  // (C,) contiguous
    const T* __restrict__ bias,    // (C,) contiguous
    const T* __restrict__ input_bias,  // (N, C) contiguous if kInputBias, else unused
    float* __restrict__ mean_out,  // (N * G,) contiguous
    float* __restrict__ rstd_out,  // (N * G,) contiguous
    Geometry geo, float eps, bool silu) {
  constexpr bool kStrided = VEC == 1;
  using PackT = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  PackT* cache = reinterpret_cast<PackT*>(shared_raw);

  const int64_t ng = blockIdx.x;
  const int64_t n = ng / geo.groups;
  const int64_t g = ng - n * geo.groups;

  const T* sample_bias = kInputBias ? input_bias + n * geo.groups * geo.cpg : nullptr;
  auto load_x = [&](int o, int i, int) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    return *reinterpret_cast<const PackT*>(x + element_offset<kStrided>(geo.x, geo, n, c, s));
  };
  // x + input_bias of pack (o, i), added after the loads are in flight (fewer live registers).
  auto with_bias = [&](const PackT& p, int o, int i) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    return add_input_bias<kInputBias, T, VEC, kChannelsInner>(p, sample_bias, c);
  };
  Moments acc{0, 0.f, 0.f};
  for_each_pack(0, geo.group_packs, geo.inner_packs, load_x, [&](const PackT& raw, int o, int i, int j) {
    const PackT p = with_bias(raw, o, i);
    cache[j] = p;  // the cache holds x + input_bias
    acc = merge(acc, pack_moments<T, VEC>(p));
  });
  const Moments total = block_reduce(acc);
  const float mean = total.mean;
  const float rstd = rstd_of(total, eps);
  if (threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  // Each thread reads back only the packs it cached itself: no barrier needed.
  auto load_cache = [&](int, int, int j) { return cache[j]; };
  for_each_pack(0, geo.group_packs, geo.inner_packs, load_cache, [&](const PackT& p, int o, int i, int) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    *reinterpret_cast<PackT*>(y + element_offset<kStrided>(geo.y, geo, n, c, s)) =
        normalize_pack<T, VEC, kChannelsInner>(p, c, mean, rstd, weight, bias, silu);
  });
}

// Two-pass, step 1: moments of packs [j0, j1) of one group -> one partial.
template <typename T, int VEC, bool kChannelsInner, bool kInputBias>
__global__ void __launch_bounds__(kThreads, 1) _stats_kernel(
    const T* __restrict__ x,         // input, as in _one_pass_kernel
    const T* __restrict__ input_bias,  // (N, C) contiguous if kInputBias, else unused
    Moments* __restrict__ partials,  // (N * G, splits) contiguous: the moments of each CTA's range
    Geometry geo) {
  constexpr bool kStrided = VEC == 1;
  using PackT = Pack<T, VEC>;
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / geo.groups;
  const int64_t g = ng - n * geo.groups;
  const int64_t splits = gridDim.y;
  const int j0 = static_cast<int>(blockIdx.y * static_cast<int64_t>(geo.group_packs) / splits);
  const int j1 = static_cast<int>((blockIdx.y + 1) * static_cast<int64_t>(geo.group_packs) / splits);

  const T* sample_bias = kInputBias ? input_bias + n * geo.groups * geo.cpg : nullptr;
  auto load_x = [&](int o, int i, int) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    return *reinterpret_cast<const PackT*>(x + element_offset<kStrided>(geo.x, geo, n, c, s));
  };
  // x + input_bias of pack (o, i), added after the loads are in flight (fewer live registers).
  auto with_bias = [&](const PackT& p, int o, int i) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    return add_input_bias<kInputBias, T, VEC, kChannelsInner>(p, sample_bias, c);
  };
  Moments acc{0, 0.f, 0.f};
  for_each_pack(j0, j1, geo.inner_packs, load_x,
                [&](const PackT& p, int o, int i, int) { acc = merge(acc, pack_moments<T, VEC>(with_bias(p, o, i))); });
  const Moments total = block_reduce(acc);
  if (threadIdx.x == 0) partials[ng * splits + blockIdx.y] = total;
}

// Two-pass, step 2: merge the group's partials, then normalise packs [j0, j1).
template <typename T, int VEC, bool kChannelsInner, bool kInputBias>
__global__ void __launch_bounds__(kThreads, 1) _apply_kernel(
    const T* __restrict__ x,              // input, as in _one_pass_kernel
    T* __restrict__ y,                    // output, as in _one_pass_kernel
    const T* __restrict__ weight,         // (C,) contiguous
    const T* __restrict__ bias,           // (C,) contiguous
    const T* __restrict__ input_bias,     // (N, C) contiguous if kInputBias, else unused
    const Moments* __restrict__ partials,  // (N * G, splits) from _stats_kernel
    float* __restrict__ mean_out,         // (N * G,); written by the split-0 CTA
    float* __restrict__ rstd_out,         // (N * G,); written by the split-0 CTA
    Geometry geo, float eps, bool silu) {
  constexpr bool kStrided = VEC == 1;
  using PackT = Pack<T, VEC>;
  __shared__ float group_mean, group_rstd;
  const int64_t ng = reversed_block_x();
  const int64_t split = reversed_block_y();
  const int64_t n = ng / geo.groups;
  const int64_t g = ng - n * geo.groups;
  const int64_t splits = gridDim.y;

  // Warp 0 merges the partials in a fixed order, so every CTA of the group
  // computes bit-identical statistics.
  if (threadIdx.x < 32) {
    const Moments m = merge_partials_in_warp(partials, ng, splits);
    if (threadIdx.x == 0) {
      group_mean = m.mean;
      group_rstd = rstd_of(m, eps);
      if (split == 0) {
        mean_out[ng] = group_mean;
        rstd_out[ng] = group_rstd;
      }
    }
  }
  __syncthreads();
  const float mean = group_mean;
  const float rstd = group_rstd;

  const int j0 = static_cast<int>(split * geo.group_packs / splits);
  const int j1 = static_cast<int>((split + 1) * geo.group_packs / splits);
  const T* sample_bias = kInputBias ? input_bias + n * geo.groups * geo.cpg : nullptr;
  auto load_x = [&](int o, int i, int) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    return *reinterpret_cast<const PackT*>(x + element_offset<kStrided>(geo.x, geo, n, c, s));
  };
  for_each_pack(j0, j1, geo.inner_packs, load_x, [&](const PackT& p, int o, int i, int) {
    int64_t c, s;
    pack_position<VEC, kChannelsInner>(geo, g, o, i, &c, &s);
    *reinterpret_cast<PackT*>(y + element_offset<kStrided>(geo.y, geo, n, c, s)) = normalize_pack<T, VEC, kChannelsInner>(
        add_input_bias<kInputBias, T, VEC, kChannelsInner>(p, sample_bias, c), c, mean, rstd, weight, bias, silu);
  });
}

// ---------------------------------------------------------------------------
// Rows path: channels-inner layouts whose groups are too narrow for 16-byte
// packs (Stable Diffusion 1.5 in NHWC has 10 or 20 channels per group, i.e.
// 20 or 40 bytes in fp16) but whose full channel rows are not. A CTA owns rows
// (spatial positions) [r0, r1) of one sample and all C channels, so each warp
// reads whole, contiguous rows with 16-byte packs.
//
// Thread mapping (R = C / VEC packs per row, rows_per_iter = blockDim.x / R,
// blockDim.x = rows_per_iter * R, not necessarily a multiple of 32):
//   thread t reads pack column p = t % R (channels [p * VEC, p * VEC + VEC))
//   of rows r0 + t / R, r0 + t / R + rows_per_iter, ...
// Program ids: blockIdx.x = n (sample), blockIdx.y = split k owning rows
// [k * S / splits, (k + 1) * S / splits).
// Two launches: _rows_stats_kernel (per-CTA, per-group partials; the last CTA
// of each sample to arrive merges them into mean / rstd), _rows_apply_kernel.
// ---------------------------------------------------------------------------

struct RowGeometry {
  int64_t groups;        // G
  int64_t cpg;           // channels per group
  int64_t spatial;       // S: rows per sample
  int row_packs;         // R = C / VEC
  int rows_per_iter;     // blockDim.x / R
  int64_t x_n, x_s;      // strides of x in elements: sample, row (the channel stride is 1)
  int64_t y_n, y_s;      // strides of y in elements: sample, row
};

// Rows [r0, r1) of one sample owned by this thread, kUnroll loads in flight:
// calls use(pack, row) for rows r0 + t / R + k * rows_per_iter.
template <typename PackT, typename Use>
__device__ __forceinline__ void for_each_row(const PackT* __restrict__ column, int64_t row_stride_packs, int64_t r0,
                                             int64_t r1, int rows_per_iter, Use use) {
  for (int64_t r = r0; r < r1; r += static_cast<int64_t>(kUnroll) * rows_per_iter) {
    PackT packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + static_cast<int64_t>(u) * rows_per_iter;
      if (row < r1) packs[u] = column[row * row_stride_packs];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + static_cast<int64_t>(u) * rows_per_iter;
      if (row < r1) use(packs[u], row);
    }
  }
}

// Rows path, step 1: per-channel Welford over this thread's rows, merged in
// shared memory over the CTA's row slots (per channel), then over each
// group's channels (per group) into one partial per (n, g, split). Then the
// CTAs of sample n count themselves in on counters[n]; the last to arrive
// merges every group's partials in split order (so the result does not depend
// on which CTA is last), writes mean / rstd, and sets counters[n] back to 0:
// the counters are zeroed once by the caller and stay zero between launches,
// so the launch needs no memset and replays from a CUDA graph as it is.
template <typename T, int VEC, bool kInputBias>
__global__ void __launch_bounds__(kThreads, 1) _rows_stats_kernel(
    const T* __restrict__ x,        // input, element (n, c, s) at n * x_n + s * x_s + c
    const T* __restrict__ input_bias,  // (N, C) contiguous if kInputBias, else unused
    Moments* __restrict__ partials,  // (N * G, splits) contiguous
    int* __restrict__ counters,     // (N,) zero on entry, zero again on exit
    float* __restrict__ mean_out,   // (N * G,) contiguous
    float* __restrict__ rstd_out,   // (N * G,) contiguous
    RowGeometry geo, float eps) {
  using PackT = Pack<T, VEC>;
  __shared__ int32_t slot_n[kThreads];            // rows seen by each row slot
  __shared__ float slot_mean[kThreads * VEC];     // [row slot][channel]
  __shared__ float slot_m2[kThreads * VEC];
  __shared__ Moments channel[kThreads * VEC];     // [channel], merged over the row slots
  const int64_t n = blockIdx.x;
  const int64_t splits = gridDim.y;
  const int64_t r0 = blockIdx.y * geo.spatial / splits;
  const int64_t r1 = (blockIdx.y + 1) * geo.spatial / splits;
  const int R = geo.row_packs;
  const int C = R * VEC;
  const int p = threadIdx.x % R;
  const int slot = threadIdx.x / R;

  int32_t count = 0;
  float mean[VEC], m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = 0.f;
  // This thread's channels never change: input_bias[n, p * VEC:(p + 1) * VEC] is loaded once.
  const T* sample_bias = kInputBias ? input_bias + n * C : nullptr;
  const PackT column_bias = kInputBias ? *reinterpret_cast<const PackT*>(sample_bias + static_cast<int64_t>(p) * VEC) : PackT{};
  const PackT* column = reinterpret_cast<const PackT*>(x + n * geo.x_n) + p;
  for_each_row(column, geo.x_s / VEC, r0 + slot, r1, geo.rows_per_iter, [&](const PackT& raw, int64_t) {
    PackT pack = raw;
    if constexpr (kInputBias) pack = add_packs(raw, column_bias);
    ++count;
    const float inv = 1.f / static_cast<float>(count);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {  // Welford, one update per channel
      const float v = to_float(pack.v[k]);
      const float d = v - mean[k];
      mean[k] += d * inv;
      m2[k] += d * (v - mean[k]);
    }
  });
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    slot_mean[slot * C + p * VEC + k] = mean[k];
    slot_m2[slot * C + p * VEC + k] = m2[k];
  }
  if (p == 0) slot_n[slot] = count;
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    Moments m{0, 0.f, 0.f};
    for (int q = 0; q < geo.rows_per_iter; ++q) m = merge(m, Moments{slot_n[q], slot_mean[q * C + c], slot_m2[q * C + c]});
    channel[c] = m;
  }
  __syncthreads();
  for (int64_t g = threadIdx.x; g < geo.groups; g += blockDim.x) {
    Moments m{0, 0.f, 0.f};
    for (int64_t c = g * geo.cpg; c < (g + 1) * geo.cpg; ++c) m = merge(m, channel[c]);
    partials[(n * geo.groups + g) * splits + blockIdx.y] = m;
  }

  // Arrival: every writer's partials are visible device-wide before the count.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + n, 1) == static_cast<int>(splits) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // pairs with the other CTAs' fences; their partials are read past L1
  // One full warp per group (blockDim.x need not be a multiple of 32: a
  // partial last warp sits this out).
  const int full_warps = static_cast<int>(blockDim.x) / 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (warp < full_warps) {
    for (int64_t g = warp; g < geo.groups; g += full_warps) {
      const int64_t ng = n * geo.groups + g;
      const Moments m = merge_partials_in_warp(partials, ng, splits);
      if ((threadIdx.x & 31) == 0) {
        mean_out[ng] = m.mean;
        rstd_out[ng] = rstd_of(m, eps);
      }
    }
  }
  if (threadIdx.x == 0) counters[n] = 0;  // every CTA of sample n has arrived: none reads it again
}

// Rows path, step 2: normalise rows [r0, r1) with per-channel scale and shift
// held in registers (this thread's VEC channels never change). Walks the grid
// backwards, like _apply_kernel.
template <typename T, int VEC, bool kInputBias>
__global__ void __launch_bounds__(kThreads, 1) _rows_apply_kernel(
    const T* __restrict__ x,            // input, as in _rows_stats_kernel
    T* __restrict__ y,                  // output, element (n, c, s) at n * y_n + s * y_s + c
    const T* __restrict__ weight,       // (C,) contiguous
    const T* __restrict__ bias,         // (C,) contiguous
    const T* __restrict__ input_bias,   // (N, C) contiguous if kInputBias, else unused
    const float* __restrict__ mean,     // (N * G,) from _rows_stats_kernel's last CTAs
    const float* __restrict__ rstd,     // (N * G,) from _rows_stats_kernel's last CTAs
    RowGeometry geo, bool silu) {
  using PackT = Pack<T, VEC>;
  const int64_t n = reversed_block_x();
  const int64_t split = reversed_block_y();
  const int64_t splits = gridDim.y;
  const int64_t r0 = split * geo.spatial / splits;
  const int64_t r1 = (split + 1) * geo.spatial / splits;
  const int p = threadIdx.x % geo.row_packs;
  const int slot = threadIdx.x / geo.row_packs;

  float shift_in[VEC], scale[VEC], shift_out[VEC];  // z = (x - mean) * (rstd * w) + b
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t c = static_cast<int64_t>(p) * VEC + k;
    const int64_t ng = n * geo.groups + c / geo.cpg;
    shift_in[k] = mean[ng];
    scale[k] = rstd[ng] * to_float(weight[c]);
    shift_out[k] = to_float(bias[c]);
  }
  const PackT* column = reinterpret_cast<const PackT*>(x + n * geo.x_n) + p;
  PackT* out_column = reinterpret_cast<PackT*>(y + n * geo.y_n) + p;
  const int64_t y_row_packs = geo.y_s / VEC;
  const T* sample_bias = kInputBias ? input_bias + n * geo.row_packs * VEC : nullptr;
  const PackT column_bias = kInputBias ? *reinterpret_cast<const PackT*>(sample_bias + static_cast<int64_t>(p) * VEC) : PackT{};
  for_each_row(column, geo.x_s / VEC, r0 + slot, r1, geo.rows_per_iter, [&](const PackT& raw, int64_t row) {
    PackT pack = raw;
    if constexpr (kInputBias) pack = add_packs(raw, column_bias);
    PackT out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float z = (to_float(pack.v[k]) - shift_in[k]) * scale[k] + shift_out[k];
      if (silu) z = z / (1.f + __expf(-z));  // SiLU: z * sigmoid(z)
      out.v[k] = from_float<T>(z);
    }
    out_column[row * y_row_packs] = out;
  });
}

// ---------------------------------------------------------------------------
// Host side: layout analysis, the plan, and the launch.
// ---------------------------------------------------------------------------

size_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// The single stride of the spatial dims when they collapse into one dim
// (size-1 dims ignored), else -1. All-size-1 spatial dims collapse with stride 1.
int64_t collapsed_spatial_stride(const int64_t* sizes, const int64_t* strides) {
  int64_t stride = -1;     // stride of the innermost non-trivial dim seen so far
  int64_t expected = -1;   // stride the next outer non-trivial dim must have
  for (int d = kMaxSpatialDims - 1; d >= 0; --d) {
    if (sizes[d] == 1) continue;
    if (stride < 0) {
      stride = strides[d];
    } else if (strides[d] != expected) {
      return -1;
    }
    expected = strides[d] * sizes[d];
  }
  return stride < 0 ? 1 : stride;
}

struct LayoutInfo {
  bool fast;            // a fast-path layout (collapsed spatial, unit inner stride) holds for x and y
  bool channels_inner;  // which dim is inner
  int64_t inner;        // inner extent of a group (elements)
  int64_t x_spatial, y_spatial;  // collapsed spatial strides (fast path)
  int vec;              // chosen pack width
};

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

LayoutInfo analyse_layout(const ForwardArgs& a) {
  LayoutInfo info{};
  const int64_t cpg = a.channels / a.groups;
  const int64_t S = a.spatial_sizes[0] * a.spatial_sizes[1] * a.spatial_sizes[2];
  info.x_spatial = collapsed_spatial_stride(a.spatial_sizes, a.x_strides.spatial);
  info.y_spatial = collapsed_spatial_stride(a.spatial_sizes, a.y_strides.spatial);
  const bool collapsed = info.x_spatial > 0 && info.y_spatial > 0;
  const bool spatial_inner = collapsed && (S == 1 || (info.x_spatial == 1 && info.y_spatial == 1));
  const bool channels_inner = collapsed && (cpg == 1 || (a.x_strides.c == 1 && a.y_strides.c == 1));
  info.fast = spatial_inner || channels_inner;
  if (info.fast) {
    // Prefer spatial-inner when both hold (S == 1 or cpg == 1): either is correct.
    info.channels_inner = !spatial_inner;
    info.inner = info.channels_inner ? cpg : S;
  } else {
    // Scalar strided path: iterate the dim with the smaller stride fastest, for coalescing.
    int64_t min_spatial = INT64_MAX;
    for (int d = 0; d < kMaxSpatialDims; ++d) {
      if (a.spatial_sizes[d] > 1 && a.x_strides.spatial[d] < min_spatial) min_spatial = a.x_strides.spatial[d];
    }
    info.channels_inner = a.x_strides.c < min_spatial;
    info.inner = info.channels_inner ? cpg : S;
    info.vec = 1;
    return info;
  }
  // The widest pack (16 bytes at most) that never straddles a group row and
  // keeps every pack start aligned: inner extent, every stride that moves a
  // pack (n, outer) and both base pointers must be multiples of VEC elements.
  const size_t esize = element_size(a.dtype);
  const int64_t x_outer = info.channels_inner ? info.x_spatial : a.x_strides.c;
  const int64_t y_outer = info.channels_inner ? info.y_spatial : a.y_strides.c;
  info.vec = 1;
  for (int vec = static_cast<int>(16 / esize); vec > 1; vec /= 2) {
    // Channels-inner packs also load input_bias[n, c:c + vec] as one pack (C and c are multiples of vec).
    const bool bias_ok = !info.channels_inner || a.input_bias == nullptr || aligned(a.input_bias, vec * esize);
    const bool ok = info.inner % vec == 0 && x_outer % vec == 0 && y_outer % vec == 0 && a.x_strides.n % vec == 0 &&
                    a.y_strides.n % vec == 0 && aligned(a.x, vec * esize) && aligned(a.y, vec * esize) && bias_ok;
    if (ok) {
      info.vec = vec;
      break;
    }
  }
  return info;
}

// The rows path applies when a group's run of channels is narrow (its packs
// are under 16 bytes, or the run is under kRowsMinGroupRunBytes, so a warp
// would read partial sectors) but whole channel rows can move in 16-byte
// packs: channel stride 1 and
// collapsed spatial dims for x and y, C a multiple of the 16-byte pack with at
// most kThreads packs per row, and aligned strides and pointers.
bool rows_eligible(const ForwardArgs& a, const LayoutInfo& info) {
  const int64_t full = static_cast<int64_t>(16 / element_size(a.dtype));
  const int64_t run_bytes = a.channels / a.groups * static_cast<int64_t>(element_size(a.dtype));
  if (info.vec >= full && run_bytes >= kRowsMinGroupRunBytes) return false;
  if (a.x_strides.c != 1 || a.y_strides.c != 1 || info.x_spatial <= 0 || info.y_spatial <= 0) return false;
  if (a.channels % full != 0 || a.channels / full > kThreads) return false;
  return info.x_spatial % full == 0 && info.y_spatial % full == 0 && a.x_strides.n % full == 0 &&
         a.y_strides.n % full == 0 && aligned(a.x, 16) && aligned(a.y, 16) &&
         (a.input_bias == nullptr || aligned(a.input_bias, 16));
}

bool valid(const ForwardArgs& a) {
  if (a.batch <= 0 || a.channels <= 0 || a.groups <= 0 || a.channels % a.groups != 0) return false;
  for (int d = 0; d < kMaxSpatialDims; ++d) {
    if (a.spatial_sizes[d] <= 0) return false;
  }
  if (a.batch * a.groups > INT32_MAX) return false;  // blockIdx.x
  const int64_t S = a.spatial_sizes[0] * a.spatial_sizes[1] * a.spatial_sizes[2];
  if (a.channels / a.groups * S > kMaxGroupElems) return false;
  if (!a.x || !a.y || !a.weight || !a.bias || !a.mean || !a.rstd) return false;
  if (!(a.eps >= 0.f)) return false;
  return a.dtype == DType::kFloat32 || a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16;
}

Geometry make_geometry(const ForwardArgs& a, const LayoutInfo& info) {
  Geometry geo{};
  const int64_t S = a.spatial_sizes[0] * a.spatial_sizes[1] * a.spatial_sizes[2];
  geo.groups = a.groups;
  geo.cpg = a.channels / a.groups;
  geo.inner_packs = static_cast<int>(info.inner / info.vec);
  geo.group_packs = static_cast<int>(geo.cpg * S / info.vec);
  geo.d1 = a.spatial_sizes[1];
  geo.d2 = a.spatial_sizes[2];
  if (info.vec == 1) {
    geo.x = Strides{a.x_strides.n, a.x_strides.c, a.x_strides.spatial[0], a.x_strides.spatial[1], a.x_strides.spatial[2]};
    geo.y = Strides{a.y_strides.n, a.y_strides.c, a.y_strides.spatial[0], a.y_strides.spatial[1], a.y_strides.spatial[2]};
  } else {
    geo.x = Strides{a.x_strides.n, a.x_strides.c, 0, 0, info.x_spatial};
    geo.y = Strides{a.y_strides.n, a.y_strides.c, 0, 0, info.y_spatial};
  }
  return geo;
}

RowGeometry make_row_geometry(const ForwardArgs& a, const LayoutInfo& info, const Plan& plan) {
  RowGeometry geo{};
  geo.groups = a.groups;
  geo.cpg = a.channels / a.groups;
  geo.spatial = a.spatial_sizes[0] * a.spatial_sizes[1] * a.spatial_sizes[2];
  geo.row_packs = static_cast<int>(a.channels / plan.vec);
  geo.rows_per_iter = plan.threads / geo.row_packs;
  geo.x_n = a.x_strides.n;
  geo.x_s = info.x_spatial;
  geo.y_n = a.y_strides.n;
  geo.y_s = info.y_spatial;
  return geo;
}

template <typename T, int VEC, bool kInputBias>
cudaError_t launch_rows(const ForwardArgs& a, const Plan& plan, const RowGeometry& geo, void* workspace, int* counters,
                        cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  Moments* partials = static_cast<Moments*>(workspace);
  const dim3 grid(static_cast<unsigned int>(a.batch), static_cast<unsigned int>(plan.splits));
  const T* ib = static_cast<const T*>(a.input_bias);
  _rows_stats_kernel<T, VEC, kInputBias><<<grid, plan.threads, 0, stream>>>(x, ib, partials, counters, a.mean, a.rstd,
                                                                        geo, a.eps);
  _rows_apply_kernel<T, VEC, kInputBias><<<grid, plan.threads, 0, stream>>>(x, static_cast<T*>(a.y), static_cast<const T*>(a.weight),
                                                               static_cast<const T*>(a.bias), ib, a.mean, a.rstd, geo, a.silu);
  return cudaGetLastError();
}

template <typename T, int VEC, bool kChannelsInner, bool kInputBias>
cudaError_t launch(const ForwardArgs& a, const Plan& plan, const Geometry& geo, void* workspace, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  const T* ib = static_cast<const T*>(a.input_bias);
  const unsigned int groups = static_cast<unsigned int>(a.batch * a.groups);
  if (plan.algorithm == Algorithm::kOnePass) {
    _one_pass_kernel<T, VEC, kChannelsInner, kInputBias><<<dim3(groups), kThreads, plan.shared_bytes, stream>>>(
        x, y, w, b, ib, a.mean, a.rstd, geo, a.eps, a.silu);
  } else {
    Moments* partials = static_cast<Moments*>(workspace);
    const dim3 grid(groups, static_cast<unsigned int>(plan.splits));
    _stats_kernel<T, VEC, kChannelsInner, kInputBias><<<grid, kThreads, 0, stream>>>(x, ib, partials, geo);
    _apply_kernel<T, VEC, kChannelsInner, kInputBias><<<grid, kThreads, 0, stream>>>(x, y, w, b, ib, partials, a.mean, a.rstd, geo,
                                                                        a.eps, a.silu);
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_layout(const ForwardArgs& a, const Plan& plan, const Geometry& geo, void* ws, cudaStream_t stream) {
  if (a.input_bias != nullptr) {
    return plan.channels_inner ? launch<T, VEC, true, true>(a, plan, geo, ws, stream)
                               : launch<T, VEC, false, true>(a, plan, geo, ws, stream);
  }
  return plan.channels_inner ? launch<T, VEC, true, false>(a, plan, geo, ws, stream)
                             : launch<T, VEC, false, false>(a, plan, geo, ws, stream);
}

template <typename T>
cudaError_t launch_dtype(const ForwardArgs& a, const LayoutInfo& info, const Plan& plan, void* ws, int* counters,
                         cudaStream_t stream) {
  if (plan.algorithm == Algorithm::kRows) {
    if (!rows_eligible(a, info) || plan.vec * sizeof(T) != 16) return cudaErrorInvalidValue;  // stale plan
    const RowGeometry geo = make_row_geometry(a, info, plan);
    return a.input_bias != nullptr ? launch_rows<T, 16 / sizeof(T), true>(a, plan, geo, ws, counters, stream)
                                   : launch_rows<T, 16 / sizeof(T), false>(a, plan, geo, ws, counters, stream);
  }
  if (info.vec != plan.vec || info.channels_inner != plan.channels_inner) return cudaErrorInvalidValue;  // stale plan
  const Geometry geo = make_geometry(a, info);
  switch (plan.vec) {
    case 1: return launch_layout<T, 1>(a, plan, geo, ws, stream);
    case 2: return launch_layout<T, 2>(a, plan, geo, ws, stream);
    case 4: return launch_layout<T, 4>(a, plan, geo, ws, stream);
    case 8:
      if constexpr (sizeof(T) == 2) return launch_layout<T, 8>(a, plan, geo, ws, stream);
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t make_plan(const ForwardArgs& a, int sm_count, Plan* plan) {
  if (!valid(a) || sm_count <= 0 || plan == nullptr) return cudaErrorInvalidValue;
  const LayoutInfo info = analyse_layout(a);
  const int64_t groups = a.batch * a.groups;
  const int64_t S = a.spatial_sizes[0] * a.spatial_sizes[1] * a.spatial_sizes[2];
  const int64_t group_elems = a.channels / a.groups * S;
  const int64_t group_packs = group_elems / info.vec;
  const int64_t target = static_cast<int64_t>(kTargetCtasPerSm) * sm_count;

  // Splits: enough CTAs for kTargetCtasPerSm per SM, but at least
  // kMinElemsPerCta elements and kThreads packs per CTA, at most kMaxSplits.
  int64_t splits = (target + groups - 1) / groups;
  int64_t most = group_elems / kMinElemsPerCta;
  if (group_packs / kThreads < most) most = group_packs / kThreads;
  if (most > kMaxSplits) most = kMaxSplits;
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;

  // One pass when a single CTA per group is the plan anyway and the group fits on chip.
  const size_t group_bytes = static_cast<size_t>(group_elems) * element_size(a.dtype);
  const bool one_pass = splits == 1 && group_bytes <= kOnePassSharedBytes;

  // Rows path when two passes are needed anyway and the group's channel runs
  // are narrow: `splits` CTAs per sample, each at least kRowsMinElemsPerCta
  // elements and one row per thread, at most kMaxSplits.
  if (!one_pass && rows_eligible(a, info)) {
    const int vec = static_cast<int>(16 / element_size(a.dtype));
    const int row_packs = static_cast<int>(a.channels / vec);
    const int rows_per_iter = kThreads / row_packs;
    int64_t row_splits = (target + a.batch - 1) / a.batch;
    int64_t row_most = S * a.channels / kRowsMinElemsPerCta;
    if (S / rows_per_iter < row_most) row_most = S / rows_per_iter;
    if (row_most > kMaxSplits) row_most = kMaxSplits;
    if (row_splits > row_most) row_splits = row_most;
    if (row_splits < 1) row_splits = 1;
    plan->algorithm = Algorithm::kRows;
    plan->splits = static_cast<int>(row_splits);
    plan->vec = vec;
    plan->channels_inner = true;
    plan->threads = rows_per_iter * row_packs;
    plan->shared_bytes = 0;
    plan->workspace_bytes = static_cast<size_t>(groups * row_splits) * sizeof(Moments);
    plan->counters = a.batch;
    plan->launches = 2;
    plan->tile_bytes = static_cast<size_t>(plan->threads) * kUnroll * 16;
    return cudaSuccess;
  }

  plan->algorithm = one_pass ? Algorithm::kOnePass : Algorithm::kTwoPass;
  plan->splits = static_cast<int>(splits);
  plan->vec = info.vec;
  plan->channels_inner = info.channels_inner;
  plan->threads = kThreads;
  plan->shared_bytes = one_pass ? group_bytes : 0;
  plan->workspace_bytes = one_pass ? 0 : static_cast<size_t>(groups * splits) * sizeof(Moments);
  plan->counters = 0;
  plan->launches = one_pass ? 1 : 2;
  plan->tile_bytes = static_cast<size_t>(kThreads) * kUnroll * info.vec * element_size(a.dtype);
  return cudaSuccess;
}

cudaError_t forward(const ForwardArgs& a, const Plan& plan, void* workspace, int* counters, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (plan.workspace_bytes > 0 && (workspace == nullptr || !aligned(workspace, 16))) return cudaErrorInvalidValue;
  if (plan.counters > 0 && counters == nullptr) return cudaErrorInvalidValue;
  const LayoutInfo info = analyse_layout(a);
  switch (a.dtype) {
    case DType::kFloat32: return launch_dtype<float>(a, info, plan, workspace, counters, stream);
    case DType::kFloat16: return launch_dtype<__half>(a, info, plan, workspace, counters, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(a, info, plan, workspace, counters, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace group_norm
}  // namespace fastdiff
