"""CUDA GroupNorm(+SiLU) forward (csrc/group_norm/) and its extension loader.

Three groups of tests:

* **CPU, always**: the ``cuda`` backend refuses CPU tensors with every backend's
  reasons; ``extension_reasons()`` explains itself without compiling anything;
  ``import fastdiff`` loads neither the loader nor torch.utils.cpp_extension;
  ``load()`` builds once, thread-safely, with one log line (the compiler is
  replaced by a recorder).
* **CPU emulation of the kernels**: csrc/group_norm/group_norm.cu compiled with
  the host C++ compiler against a small shim that runs each CTA's threads as OS
  threads (``__syncthreads`` and ``__shfl_down_sync`` become barriers). This
  runs the real kernel and launch-plan code, every layout / dtype / path,
  against the float64 oracle on machines without a GPU. Launch constants are
  shrunk (64 threads, tiny per-CTA minimum, 2 KiB on-chip budget) so that small
  shapes take the split two-pass path too; the emulation says nothing about
  speed or about the torch binding.
* **GPU** (``gpu`` marker, skipped without CUDA): the real extension through
  ``fastdiff.ops.group_norm(backend="cuda")`` and the raw op: NCHW / NHWC,
  fp32 / fp16 / bf16, SiLU on and off, odd shapes, a misaligned view, Stable
  Diffusion shapes, gradients, and ``torch.library.opcheck``.

Tolerances: fp32 to ~1e-5 relative; fp16/bf16 at most 2x the error of plain
PyTorch in the same dtype, both against a float64 reference.
"""

import ctypes
import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from _utils import assert_fp32_close, assert_low_precision_ok, requires_cuda

import fastdiff
from fastdiff.backends import BackendNotSupportedError
from fastdiff.ops.group_norm import group_norm, group_norm_ref, group_norm_stats_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SOURCE = os.path.join(REPO, "csrc", "group_norm", "group_norm.cu")
EPS = 1e-5
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _randn(*shape, dtype=torch.float32, device="cpu"):
    """Fresh random values with a non-zero mean (never zeros)."""
    return (torch.randn(*shape, device=device) * 2 + 0.5).to(dtype)


def _affine(c, dtype, device="cpu"):
    return torch.randn(c, device=device).to(dtype), torch.randn(c, device=device).to(dtype)


def _with_input_bias(x, input_bias):
    """x + input_bias[:, :, None, ...] in x's dtype (rounded there, as PyTorch adds), or x."""
    if input_bias is None:
        return x
    return x + input_bias.view(*input_bias.shape, *([1] * (x.dim() - 2)))


def _check_output(y, x, groups, w, b, activation, what="output", input_bias=None):
    """y against the float64 oracle (of x + input_bias, summed in x's dtype): fp32 to
    1e-5 relative, else <= 2x PyTorch's own error."""
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride(), "the output must keep x's memory format"
    oracle = group_norm_ref(_with_input_bias(x, input_bias).double(), groups, w.double(), b.double(), EPS, activation)
    if x.dtype == torch.float32:
        assert_fp32_close(y, oracle, what=what)
    else:
        baseline = group_norm_ref(x, groups, w, b, EPS, activation, upcast=False, input_bias=input_bias)
        assert_low_precision_ok(y, baseline, oracle, what=what)


def _check_stats(mean, rstd, x, groups, input_bias=None):
    mean_ref, rstd_ref = group_norm_stats_ref(_with_input_bias(x, input_bias).double(), groups, EPS)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0], groups)
    assert_fp32_close(mean, mean_ref, what="mean")
    assert_fp32_close(rstd, rstd_ref, what="rstd")


# ---------------------------------------------------------------------------
# CPU: dispatch, loader, import cost.
# ---------------------------------------------------------------------------


def test_forced_cuda_on_cpu_tensor_lists_every_backend(seed):
    x = _randn(2, 6, 7, 9)
    w, b = _affine(6, torch.float32)
    with pytest.raises(BackendNotSupportedError) as info:
        group_norm(x, 3, w, b, activation="silu", backend="cuda")
    message = str(info.value)
    assert "'cuda'" in message and "backend= argument" in message
    lines = message.splitlines()[1:]
    for name in ("reference", "triton", "cuda"):
        assert any(line.strip().startswith(f"{name}:") for line in lines), f"{name} missing from:\n{message}"
    cuda_line = next(line for line in lines if line.strip().startswith("cuda:"))
    assert "needs CUDA tensors, got cpu" in cuda_line


def test_use_backend_cuda_on_cpu_tensor_raises(seed):
    x = _randn(1, 4, 5)
    with fastdiff.use_backend(group_norm="cuda"), pytest.raises(BackendNotSupportedError, match="cuda"):
        group_norm(x, 2)


def _run_python(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_import_fastdiff_loads_no_extension_machinery():
    out = _run_python(
        "import sys, fastdiff, fastdiff.ops\n"
        "print('fastdiff._extension' in sys.modules, 'torch.utils.cpp_extension' in sys.modules, 'fastdiff._C' in sys.modules)"
    )
    assert out[-1] == "False False False", "import fastdiff / fastdiff.ops must not touch the CUDA extension"


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the reasons of a torch built without CUDA")
def test_extension_reasons_on_cpu_torch_compile_nothing(tmp_path):
    out = _run_python(
        "import sys\n"
        "from fastdiff import _extension\n"
        "reasons = _extension.extension_reasons()\n"
        "print(len(reasons))\n"
        "print(reasons[0])\n"
        "print('torch.utils.cpp_extension' in sys.modules)\n",
        {"TORCH_EXTENSIONS_DIR": str(tmp_path)},
    )
    count, first, imported = out[-3:]
    assert int(count) >= 1
    assert "built without CUDA" in first and torch.__version__ in first
    assert imported == "False", "extension_reasons() must not import the compiler machinery"
    assert os.listdir(tmp_path) == [], "extension_reasons() must not create a build directory"


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks load() on a torch built without CUDA")
def test_load_raises_with_reasons_on_cpu_torch(monkeypatch):
    from fastdiff import _extension

    monkeypatch.setattr(_extension, "_loaded", None)
    with pytest.raises(RuntimeError, match="cannot load the CUDA extension: .*built without CUDA"):
        _extension.load()


def test_load_builds_once_across_threads_with_one_log_line(monkeypatch, tmp_path, caplog):
    """With a fake compiler: load() JIT-builds every csrc source once, into the
    cache directory, logging one INFO line, however many threads race for it."""
    from torch.utils import cpp_extension

    from fastdiff import _extension

    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)

    real_reasons = _extension.extension_reasons
    monkeypatch.setattr(_extension, "_loaded", None)
    monkeypatch.setattr(_extension, "_prebuilt_available", lambda: False)
    monkeypatch.setattr(_extension, "extension_reasons", lambda: [])
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    caplog.set_level(logging.INFO, logger="fastdiff._extension")

    barrier = threading.Barrier(6)
    results = []

    def worker():
        barrier.wait()
        results.append(_extension.load())

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(calls) == 1, f"load() built {len(calls)} times"
    assert len(set(results)) == 1 and len(results) == 6
    kwargs = calls[0]
    expected = sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.cu"), recursive=True))
    expected += sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.cpp"), recursive=True))
    assert kwargs["sources"] == expected
    assert KERNEL_SOURCE in kwargs["sources"]
    assert kwargs["is_python_module"] is False
    assert kwargs["extra_include_paths"] == [os.path.join(REPO, "csrc")]
    build_dir = kwargs["build_directory"]
    assert os.path.dirname(build_dir) == str(tmp_path) and os.path.isdir(build_dir)
    assert "arch-8.0_9.0_PTX" in os.path.basename(build_dir) and torch.__version__.replace("+", "_") in build_dir
    infos = [r for r in caplog.records if r.name == "fastdiff._extension" and r.levelno == logging.INFO]
    assert len(infos) == 1 and build_dir in infos[0].getMessage()
    assert real_reasons() == [], "a loaded extension has no reasons left"


# ---------------------------------------------------------------------------
# CPU emulation of the CUDA kernels.
# ---------------------------------------------------------------------------

# Runs CUDA kernels on the host: a CTA's threads are OS threads, CTAs run one
# after another (so `static` stands in for __shared__), and __syncthreads /
# __shfl_down_sync are barriers over the CTA / warp.
_EMU_PRELUDE = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <random>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define cudaGetLastError() cudaSuccess
namespace emu {
inline dim3 grid_dim, block_dim;
inline thread_local uint3 thread_idx, block_idx;
struct Block {
  explicit Block(unsigned threads) : block_barrier(threads), exchange(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> exchange;
};
inline Block* current = nullptr;
inline unsigned char* dynamic_shared = nullptr;
inline unsigned cta_order_seed = 0;  // 0: CTAs in grid order; else a shuffled order (arrival order of a real GPU varies)
template <class V>  // float or int32: both round-trip through double exactly
inline V shfl_down(unsigned, V v, int offset) {
  Block& b = *current;
  const unsigned t = thread_idx.x, lane = t % 32;
  b.exchange[t] = static_cast<double>(v);
  b.warp_barriers[t / 32]->arrive_and_wait();
  const V r = lane + offset < 32 ? static_cast<V>(b.exchange[t + offset]) : v;
  b.warp_barriers[t / 32]->arrive_and_wait();
  return r;
}
template <class F>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, F kernel) {
  grid_dim = grid;
  block_dim = block;
  std::vector<unsigned char> dyn(shared_bytes + 16, 0xCD);  // garbage, like real shared memory
  dynamic_shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn.data()) + 15) / 16 * 16);
  std::vector<uint3> ctas;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) ctas.push_back(uint3{bx, by, 0});
  }
  if (cta_order_seed != 0) std::shuffle(ctas.begin(), ctas.end(), std::mt19937(cta_order_seed));
  for (const uint3 cta : ctas) {
    {
      const unsigned bx = cta.x, by = cta.y;
      Block b(block.x);
      current = &b;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, t] {
          thread_idx = uint3{t, 0, 0};
          block_idx = uint3{bx, by, 0};
          kernel();
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
}  // namespace emu
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim
#define __syncthreads() emu::current->block_barrier.arrive_and_wait()
#define __shfl_down_sync emu::shfl_down
#define __ldcg(p) (*(p))
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define atomicAdd(p, v) std::atomic_ref<int>(*(p)).fetch_add(v)
#define __expf(x) std::exp(x)
#define rsqrtf(x) (1.f / std::sqrt(x))
"""

# A C entry point over make_plan + forward, called through ctypes.
_EMU_HARNESS = r"""
#include "group_norm_emulated.cpp"
using namespace fastdiff::group_norm;
static ForwardArgs make_args(int dtype, int64_t batch, int64_t channels, int64_t groups, const int64_t* sizes,
                             const void* x, const int64_t* xs, void* y, const int64_t* ys, const void* w,
                             const void* b, const void* input_bias, float* mean, float* rstd, float eps, int silu) {
  ForwardArgs a{};
  a.dtype = static_cast<DType>(dtype);
  a.batch = batch;
  a.channels = channels;
  a.groups = groups;
  for (int d = 0; d < 3; ++d) a.spatial_sizes[d] = sizes[d];
  a.x = x;
  a.y = y;
  a.x_strides = TensorStrides{xs[0], xs[1], {xs[2], xs[3], xs[4]}};
  a.y_strides = TensorStrides{ys[0], ys[1], {ys[2], ys[3], ys[4]}};
  a.weight = w;
  a.bias = b;
  a.input_bias = input_bias;
  a.mean = mean;
  a.rstd = rstd;
  a.eps = eps;
  a.silu = silu != 0;
  return a;
}
static void report(const Plan& plan, int64_t* plan_out) {
  plan_out[0] = static_cast<int64_t>(plan.algorithm);
  plan_out[1] = plan.splits;
  plan_out[2] = plan.vec;
  plan_out[3] = plan.channels_inner;
  plan_out[4] = plan.launches;
  plan_out[5] = static_cast<int64_t>(plan.tile_bytes);
}
// The kernels' Chan merge, in order, over k partial moments (counts up to 2^31 - 1).
extern "C" void emu_merge_moments(const int64_t* counts, const float* means, const float* m2s, int k,
                                  int64_t* count_out, float* mean_out, float* m2_out) {
  Moments total{0, 0.f, 0.f};
  for (int i = 0; i < k; ++i) {
    using Count = decltype(total.n);
    total = merge(total, Moments{static_cast<Count>(counts[i]), means[i], m2s[i]});
  }
  *count_out = static_cast<int64_t>(total.n);
  *mean_out = total.mean;
  *m2_out = total.m2;
}
static std::vector<int> emu_counters(64, 0);
// make_plan + forward. With run == 0, only make_plan (the pointers are never read).
extern "C" int emu_group_norm(int dtype, int64_t batch, int64_t channels, int64_t groups, const int64_t* sizes,
                              const void* x, const int64_t* xs, void* y, const int64_t* ys, const void* w,
                              const void* b, const void* input_bias, float* mean, float* rstd, float eps, int silu,
                              int sm_count, int64_t* plan_out, int run) {
  const ForwardArgs a = make_args(dtype, batch, channels, groups, sizes, x, xs, y, ys, w, b, input_bias, mean, rstd, eps, silu);
  Plan plan{};
  const cudaError_t status = make_plan(a, sm_count, &plan);
  if (status != cudaSuccess) return static_cast<int>(status);
  report(plan, plan_out);
  if (!run) return 0;
  std::vector<float> workspace(plan.workspace_bytes / sizeof(float) + 4, 12345.f);
  if (plan.counters > static_cast<int64_t>(emu_counters.size())) return -1;
  return static_cast<int>(forward(a, plan, plan.workspace_bytes ? workspace.data() : nullptr,
                                  plan.counters ? emu_counters.data() : nullptr, nullptr));
}
// The rows path's counters: zeroed once, here, like the binding's; every launch must leave them zero.
extern "C" int64_t emu_counters_sum() {
  int64_t sum = 0;
  for (int c : emu_counters) sum += c < 0 ? -c : c;
  return sum;
}
extern "C" void emu_set_cta_order_seed(unsigned seed) { emu::cta_order_seed = seed; }
"""

# Launch constants shrunk so that small shapes exercise every path.
_EMU_CONSTANTS = {
    "constexpr int kThreads = 256;": "constexpr int kThreads = 64;",
    "constexpr int64_t kMinElemsPerCta = 2048;": "constexpr int64_t kMinElemsPerCta = 64;",
    "constexpr size_t kOnePassSharedBytes = 44 * 1024;": "constexpr size_t kOnePassSharedBytes = 2048;",
    "constexpr int64_t kRowsMinElemsPerCta = 8192;": "constexpr int64_t kRowsMinElemsPerCta = 64;",
    "constexpr int64_t kRowsMinGroupRunBytes = 64;": "constexpr int64_t kRowsMinGroupRunBytes = 16;",
    # 64 threads move 4 KB per loop trip: the real kernels' 8-16 KB check does not apply here.
    'static_assert(kTileBytes >= 8 * 1024 && kTileBytes <= 16 * 1024, "a CTA\'s loop trip should move 8-16 KB");': "",
}

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALGORITHMS = {0: "one_pass", 1: "two_pass", 2: "rows"}


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates.append("/usr/local/cuda/include")
    return next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_bf16.h"))), None)


def _emulated_source(constants):
    with open(KERNEL_SOURCE) as f:
        source = f.read()
    for old, new in constants.items():
        assert source.count(old) == 1, f"launch constant {old!r} changed; update _EMU_CONSTANTS"
        source = source.replace(old, new)
    source, n = re.subn(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];", r"unsigned char* \1 = emu::dynamic_shared;", source)
    assert n == 1, "dynamic shared memory declaration changed; update the emulator"
    launches = source.count("<<<")
    source, n = re.subn(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", r"emu::launch(\2, [=]() { \1(\3); });", source, flags=re.S)
    assert n == launches > 0, "kernel launches changed shape; update the emulator"
    return source


class _Emulator:
    def __init__(self, library_path):
        self.lib = ctypes.CDLL(library_path)

    def merge(self, counts, means, m2s):
        """The kernels' Chan merge over partial moments, in order: (count, mean, M2)."""
        k = len(counts)
        count, mean, m2 = ctypes.c_int64(), ctypes.c_float(), ctypes.c_float()
        self.lib.emu_merge_moments(
            (ctypes.c_int64 * k)(*counts), (ctypes.c_float * k)(*means.tolist()), (ctypes.c_float * k)(*m2s.tolist()),
            ctypes.c_int(k), ctypes.byref(count), ctypes.byref(mean), ctypes.byref(m2),
        )  # fmt: skip
        return count.value, mean.value, m2.value

    def __call__(self, x, groups, w, b, silu, sm_count, y=None, run=True, input_bias=None):
        """Runs the emulated forward (of x + input_bias when given: (N, C), x's dtype,
        passed as is, views and misaligned pointers included); returns y, mean, rstd
        and the launch plan. With ``run=False`` only the plan is made and no tensor is read."""
        assert input_bias is None or (input_bias.shape == x.shape[:2] and input_bias.is_contiguous())
        y = torch.empty_like(x) if y is None else y
        n = x.shape[0]
        mean = torch.full((n, groups), float("nan"))
        rstd = torch.full((n, groups), float("nan"))
        pad = 5 - x.dim()

        def int64s(values):
            return (ctypes.c_int64 * len(values))(*values)

        def strides(t):
            return int64s([t.stride(0), t.stride(1)] + [0] * pad + list(t.stride()[2:]))

        plan = (ctypes.c_int64 * 6)()
        status = self.lib.emu_group_norm(
            _DTYPE_CODES[x.dtype], ctypes.c_int64(n), ctypes.c_int64(x.shape[1]), ctypes.c_int64(groups),
            int64s([1] * pad + list(x.shape[2:])), ctypes.c_void_p(x.data_ptr()), strides(x),
            ctypes.c_void_p(y.data_ptr()), strides(y), ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(b.data_ptr()),
            ctypes.c_void_p(None if input_bias is None else input_bias.data_ptr()),
            ctypes.c_void_p(mean.data_ptr()), ctypes.c_void_p(rstd.data_ptr()), ctypes.c_float(EPS),
            ctypes.c_int(int(silu)), ctypes.c_int(sm_count), plan, ctypes.c_int(int(run)),
        )  # fmt: skip
        assert status == 0, f"make_plan/forward returned cudaError {status}"
        assert self.lib.emu_counters_sum() == 0, "a launch left the rows path's counters non-zero"
        keys = ("splits", "vec", "channels_inner", "launches", "tile_bytes")
        described = {"algorithm": _ALGORITHMS[plan[0]], **dict(zip(keys, plan[1:]))}
        return y, mean, rstd, {**described, "channels_inner": bool(described["channels_inner"])}


def _build_emulator(work, constants):
    gxx = shutil.which("g++")
    include = _cuda_include_dir()
    if gxx is None or include is None:
        pytest.skip("the CUDA-kernel emulation needs g++ and the CUDA headers (cuda_bf16.h)")
    (work / "prelude.h").write_text(_EMU_PRELUDE)
    (work / "group_norm_emulated.cpp").write_text(_emulated_source(constants))
    (work / "harness.cpp").write_text(_EMU_HARNESS)
    library = work / "group_norm_emulated.so"
    cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{include}", f"-I{os.path.dirname(KERNEL_SOURCE)}",
           "-include", str(work / "prelude.h"), str(work / "harness.cpp"), "-o", str(library)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, "the kernels do not compile for the emulator:\n" + result.stderr[-4000:]
    return _Emulator(str(library))


@pytest.fixture(scope="module")
def emulate(tmp_path_factory):
    """The kernels with shrunk launch constants, so small shapes take every path."""
    return _build_emulator(tmp_path_factory.mktemp("group_norm_emulator"), _EMU_CONSTANTS)


@pytest.fixture(scope="module")
def real_plan(tmp_path_factory):
    """make_plan with the real launch constants (the kernels are not run)."""
    emulator = _build_emulator(tmp_path_factory.mktemp("group_norm_plan"), {})

    def plan(x, groups, sm_count):
        w, b = torch.empty(x.shape[1], dtype=x.dtype), torch.empty(x.shape[1], dtype=x.dtype)
        return emulator(x, groups, w, b, True, sm_count, run=False)[3]

    return plan


# name -> (builder(dtype) -> x, groups). Odd sizes, both layouts, views.
EMU_LAYOUTS = {
    "nchw": lambda dt: (_randn(2, 6, 7, 9, dtype=dt), 3),
    "nhwc": lambda dt: (_randn(3, 6, 7, 9, dtype=dt).to(memory_format=torch.channels_last), 3),
    "nchw_vec": lambda dt: (_randn(2, 16, 16, 16, dtype=dt), 4),
    "nhwc_vec": lambda dt: (_randn(2, 32, 8, 10, dtype=dt).to(memory_format=torch.channels_last), 2),
    "nhwc_vec_small": lambda dt: (_randn(3, 16, 5, 7, dtype=dt).to(memory_format=torch.channels_last), 2),
    "nhwc_c20_g2": lambda dt: (_randn(1, 20, 9, 7, dtype=dt).to(memory_format=torch.channels_last), 2),
    "nhwc_rows_cpg10": lambda dt: (_randn(2, 40, 7, 9, dtype=dt).to(memory_format=torch.channels_last), 4),
    "nhwc_rows_cpg2": lambda dt: (_randn(1, 16, 20, 24, dtype=dt).to(memory_format=torch.channels_last), 8),
    "1d": lambda dt: (_randn(3, 8, 33, dtype=dt), 2),
    "3d_ncdhw": lambda dt: (_randn(1, 6, 3, 4, 5, dtype=dt), 3),
    "3d_channels_last": lambda dt: (_randn(2, 8, 3, 4, 6, dtype=dt).to(memory_format=torch.channels_last_3d), 4),
    "misaligned": lambda dt: (_randn(2 * 16 * 8 * 8 + 1, dtype=dt)[1:].view(2, 16, 8, 8), 4),
    "channel_slice": lambda dt: (_randn(2, 10, 7, 9, dtype=dt)[:, 2:8], 3),
    "step2_spatial": lambda dt: (_randn(2, 6, 7, 10, dtype=dt)[..., ::2], 3),
    "batch_stride": lambda dt: (_randn(6, 8, 4, 8, dtype=dt)[::2], 4),
}

# sm_count values steering the plan: 1 = one CTA per group where it fits,
# 16 = split each group over up to 64 CTAs.
EMU_SM_COUNTS = (1, 16)


@pytest.mark.parametrize("sm_count", EMU_SM_COUNTS)
@pytest.mark.parametrize("layout", sorted(EMU_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_emulated_forward(emulate, seed, layout, dtype, sm_count):
    x, groups = EMU_LAYOUTS[layout](dtype)
    w, b = _affine(x.shape[1], dtype)
    # Each layout and dtype sees SiLU on one path, not on the other, and input_bias
    # on one path, not on the other (paired differently, so all four combinations occur).
    silu = (sm_count == 1) == (dtype == torch.float32)
    input_bias = _randn(*x.shape[:2], dtype=dtype) if (sm_count == 1) == (dtype != torch.float16) else None
    y, mean, rstd, plan = emulate(x, groups, w, b, silu, sm_count, input_bias=input_bias)
    what = f"{layout} {plan} input_bias={input_bias is not None}"
    _check_output(y, x, groups, w, b, "silu" if silu else None, what=what, input_bias=input_bias)
    _check_stats(mean, rstd, x, groups, input_bias=input_bias)


@pytest.mark.parametrize(
    "layout, dtype, sm_count, expected",
    [
        ("nchw_vec", torch.float16, 1, {"algorithm": "one_pass", "vec": 8, "channels_inner": False}),
        ("nchw_vec", torch.float32, 16, {"algorithm": "two_pass", "vec": 4, "channels_inner": False}),
        ("nhwc_vec", torch.bfloat16, 16, {"algorithm": "two_pass", "vec": 8, "channels_inner": True}),
        ("nhwc_vec_small", torch.float16, 1, {"algorithm": "one_pass", "vec": 8, "channels_inner": True}),
        ("nhwc_c20_g2", torch.float16, 1, {"vec": 2, "channels_inner": True}),  # 10 channels per group: 4-byte packs
        ("nhwc", torch.float32, 1, {"algorithm": "one_pass", "vec": 2, "channels_inner": True}),
        ("misaligned", torch.float16, 1, {"vec": 1}),
        ("misaligned", torch.float32, 16, {"vec": 1, "algorithm": "two_pass"}),
        ("step2_spatial", torch.float32, 1, {"vec": 1}),
        ("3d_channels_last", torch.float16, 1, {"algorithm": "one_pass", "vec": 2, "channels_inner": True}),
        ("nhwc_rows_cpg10", torch.float16, 16, {"algorithm": "rows", "vec": 8}),  # 60 threads: a partial warp
        ("nhwc_rows_cpg10", torch.float32, 1, {"algorithm": "rows", "vec": 4}),
        ("nhwc_rows_cpg2", torch.bfloat16, 16, {"algorithm": "rows", "vec": 8}),  # a pack spans 4 groups
    ],
)
def test_emulated_plan(emulate, seed, layout, dtype, sm_count, expected):
    """Vectorised packs exactly when sizes, strides and alignment allow them;
    the split path when the groups alone would not fill the (emulated) GPU."""
    x, groups = EMU_LAYOUTS[layout](dtype)
    w, b = _affine(x.shape[1], dtype)
    y, _, _, plan = emulate(x, groups, w, b, True, sm_count)
    assert {k: plan[k] for k in expected} == expected
    if plan["algorithm"] != "one_pass" and sm_count > 1:
        assert plan["splits"] > 1
    _check_output(y, x, groups, w, b, "silu")


@pytest.mark.parametrize(
    "layout, sm_count, algorithm",
    [("nchw_vec", 1, "one_pass"), ("nchw_vec", 16, "two_pass"), ("nhwc_vec", 16, "two_pass"), ("nhwc_rows_cpg10", 16, "rows")],
)
def test_emulated_input_bias_is_added_in_x_dtype(emulate, seed, layout, sm_count, algorithm):
    """fp16 x + input_bias rounds to fp16 before the statistics, as PyTorch's sum does:
    with a bias of ~2000 the fp16 spacing (1.0) is a large part of x's spread (std 2), so
    statistics of the unrounded sum would miss the oracle by far more than fp32 noise."""
    x, groups = EMU_LAYOUTS[layout](torch.float16)
    w, b = _affine(x.shape[1], torch.float16)
    input_bias = (torch.rand(*x.shape[:2]) * 2 + 2000).half()
    y, mean, rstd, plan = emulate(x, groups, w, b, False, sm_count, input_bias=input_bias)
    assert plan["algorithm"] == algorithm
    _check_stats(mean, rstd, x, groups, input_bias=input_bias)
    unrounded = x.double() + input_bias.double().view(*input_bias.shape, 1, 1)
    _, rstd_unrounded = group_norm_stats_ref(unrounded, groups, EPS)
    assert ((rstd.double() - rstd_unrounded).abs() / rstd_unrounded).max() > 1e-3, "the sum must round to fp16 first"
    _check_output(y, x, groups, w, b, None, input_bias=input_bias)


def test_emulated_misaligned_input_bias_narrows_the_packs(emulate, seed):
    """Channels-inner packs load input_bias[n, c:c + 8] as one pack; an input_bias
    that is not 16-byte aligned gets narrower packs (and no rows path), still exact."""
    for layout, groups_path in (("nhwc_vec", "two_pass"), ("nhwc_rows_cpg10", "rows")):
        x, groups = EMU_LAYOUTS[layout](torch.float16)
        w, b = _affine(x.shape[1], torch.float16)
        storage = _randn(x.shape[0] * x.shape[1] + 1, dtype=torch.float16)
        aligned, misaligned = storage[:-1].view(x.shape[:2]), storage[1:].view(x.shape[:2])
        assert emulate(x, groups, w, b, True, 16, input_bias=aligned, run=False)[3]["algorithm"] == groups_path
        y, mean, rstd, plan = emulate(x, groups, w, b, True, 16, input_bias=misaligned)
        assert plan["vec"] == 1 and plan["algorithm"] != "rows", (layout, plan)
        _check_output(y, x, groups, w, b, "silu", what=layout, input_bias=misaligned)
        _check_stats(mean, rstd, x, groups, input_bias=misaligned)


def test_emulated_merge_counts_exactly_past_2_24(emulate, seed):
    """Partial counts add exactly in the kernels' merge (a VAE group at 2048x2048 holds
    2^24 values with 128 channels, more with more): an fp32 count would round
    2^24 + 1 down and lose odd counts, here the total is checked to the unit."""
    counts = [2**24 + 1, 3, 2**24 - 1, 5, 2**23 + 7, 1, 999_999]
    means = torch.randn(len(counts)) + 3.0
    m2s = torch.rand(len(counts)) * torch.tensor(counts, dtype=torch.float32)
    total, mean, m2 = emulate.merge(counts, means, m2s)
    assert total == sum(counts) > 2**25
    c, mu = torch.tensor(counts, dtype=torch.float64), means.double()
    mean_ref = (c * mu).sum() / c.sum()
    m2_ref = m2s.double().sum() + (c * (mu - mean_ref) ** 2).sum()
    assert abs(mean - mean_ref.item()) <= 4e-6 * abs(mean_ref.item())
    assert abs(m2 - m2_ref.item()) <= 1e-5 * m2_ref.item()


@pytest.mark.parametrize("layout", ["nhwc_rows_cpg10", "nhwc_rows_cpg2"])
def test_emulated_rows_last_cta_merges_deterministically(emulate, seed, layout):
    """The rows path is two launches: the last CTA of each sample to finish its
    statistics merges the partials in a fixed order. Whichever CTA arrives last
    (the emulator shuffles the CTA order), y, mean and rstd are bitwise the same,
    and the counters are back to zero after every launch (checked by the emulator
    after each call), so the next launch or graph replay needs no memset."""
    x, groups = EMU_LAYOUTS[layout](torch.bfloat16)
    x = torch.cat([x, x.flip(0) * 0.5 + 1]).contiguous(memory_format=torch.channels_last)  # 2+ samples
    w, b = _affine(x.shape[1], torch.bfloat16)
    input_bias = _randn(*x.shape[:2], dtype=torch.bfloat16)
    results = []
    try:
        for order_seed in (0, 1, 2, 3):
            emulate.lib.emu_set_cta_order_seed(ctypes.c_uint(order_seed))
            results.append(emulate(x, groups, w, b, True, 16, input_bias=input_bias))
    finally:
        emulate.lib.emu_set_cta_order_seed(ctypes.c_uint(0))
    y, mean, rstd, plan = results[0]
    assert plan["algorithm"] == "rows" and plan["splits"] > 1 and plan["launches"] == 2, plan
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other[:3], (y, mean, rstd)))
    _check_output(y, x, groups, w, b, "silu", input_bias=input_bias)
    _check_stats(mean, rstd, x, groups, input_bias=input_bias)


def test_emulated_two_pass_single_split(emulate, seed):
    """Enough groups to fill the GPU but each too big for shared memory: two passes, one split."""
    x = _randn(4, 4, 24, 24)
    w, b = _affine(4, torch.float32)
    y, mean, rstd, plan = emulate(x, 1, w, b, False, 1)
    assert plan["algorithm"] == "two_pass" and plan["splits"] == 1
    _check_output(y, x, 1, w, b, None)
    _check_stats(mean, rstd, x, 1)


def test_emulated_statistics_survive_a_large_offset(emulate, seed):
    """Welford/Chan merging keeps the variance when the mean dwarfs the spread
    (sum / sum-of-squares in fp32 would lose it entirely at this offset)."""
    x = torch.randn(2, 8, 16, 16) + 1000.0
    w, b = _affine(8, torch.float32)
    y, mean, rstd, plan = emulate(x, 2, w, b, False, 16)
    assert plan["algorithm"] == "two_pass" and plan["splits"] > 1
    xg = x.double().reshape(2, 2, -1)
    assert_fp32_close(mean, xg.mean(-1), what="mean")
    rstd_ref = 1 / torch.sqrt(xg.var(-1, unbiased=False) + EPS)
    assert ((rstd.double() - rstd_ref).abs() / rstd_ref).max() < 1e-4
    # x - mean keeps only ~1e-4 of x's relative precision at this offset.
    assert_fp32_close(y, group_norm_ref(x.double(), 2, w.double(), b.double(), EPS), rtol=2e-4)


def test_emulated_output_into_other_layout(emulate, seed):
    """x and y strides are independent (a non-dense x gets a dense y from empty_like)."""
    x, groups = EMU_LAYOUTS["nhwc_vec"](torch.float16)
    w, b = _affine(x.shape[1], torch.float16)
    y = torch.empty(x.shape, dtype=x.dtype)  # NCHW output of an NHWC input: no common fast path
    y, _, _, plan = emulate(x, groups, w, b, True, 1, y=y)
    assert plan["vec"] == 1
    oracle = group_norm_ref(x.double(), groups, w.double(), b.double(), EPS, "silu")
    assert_low_precision_ok(y, group_norm_ref(x, groups, w, b, EPS, "silu", upcast=False), oracle)


# Stable Diffusion 1.5 / SDXL UNet and VAE GroupNorm shapes at batch 2 (CFG), 32 groups.
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (2, 320, 128, 128), (2, 512, 128, 128), (2, 256, 256, 256)]
H100_SMS = 132


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plan_fills_an_h100_on_sd_shapes(real_plan, shape, channels_last):
    """Real launch constants: at least one full wave of CTAs on every SD shape
    but the 320 KB 8x8 one (one-pass, launch-bound; see group_norm.cu), and
    16-byte packs everywhere: per group where a group's run of channels is
    wide enough, else (NHWC with fewer than 32 channels per group) over whole
    channel rows."""
    x = torch.empty(shape, dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    plan = real_plan(x, 32, H100_SMS)
    ctas_per_split = shape[0] if plan["algorithm"] == "rows" else shape[0] * 32
    ctas = ctas_per_split * plan["splits"]
    if shape[2] == 8:
        assert plan["algorithm"] == "one_pass" and ctas == 64
    else:
        assert plan["algorithm"] != "one_pass" and ctas >= H100_SMS, plan
    assert plan["vec"] == 8 and plan["channels_inner"] == channels_last
    narrow_groups = channels_last and shape[1] // 32 * 2 < 64
    assert (plan["algorithm"] == "rows") == narrow_groups
    assert plan["launches"] == (1 if plan["algorithm"] == "one_pass" else 2)


def test_plan_one_pass_when_groups_fill_the_gpu(real_plan):
    """Many small groups: one CTA per group, each group read once."""
    x = torch.empty(16, 256, 16, 16, dtype=torch.float16)
    plan = real_plan(x, 32, H100_SMS)
    assert plan == {"algorithm": "one_pass", "splits": 1, "vec": 8, "channels_inner": False, "launches": 1, "tile_bytes": 16384}


# The VAE decoder at 2048x2048 output (latents 256x256), batch 1, 32 groups: up to
# 2^24 values per group.
VAE_2048_SHAPES = [(1, 512, 256, 256), (1, 512, 512, 512), (1, 256, 1024, 1024), (1, 128, 2048, 2048)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", VAE_2048_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plan_keeps_bytes_in_flight_on_vae_shapes(real_plan, shape, channels_last, dtype):
    """Real launch constants on VAE-sized tensors: 16-byte packs, 8-16 KB per CTA loop
    trip, and at least a full wave of CTAs holding >= 16 KB in flight per H100 SM
    (~3.3 TB/s x ~600 ns of latency needs ~15 KB per SM). At batch 1 the rows path
    stops at kMaxSplits = 256 CTAs, about 2 per SM: ~31 KB per SM."""
    # Never touched (only the plan is made), so these up to 2 GB cost no memory.
    x = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    plan = real_plan(x, 32, H100_SMS)
    assert plan["vec"] * x.element_size() == 16, plan
    assert 8 * 1024 <= plan["tile_bytes"] <= 16 * 1024, plan
    ctas = plan["splits"] * (shape[0] if plan["algorithm"] == "rows" else shape[0] * 32)
    assert ctas >= H100_SMS and ctas * plan["tile_bytes"] >= 16 * 1024 * H100_SMS, plan


# ---------------------------------------------------------------------------
# GPU: the real extension.
# ---------------------------------------------------------------------------

def _cuda_layouts(dtype):
    dev = "cuda"
    return {
        "nchw": (_randn(2, 64, 33, 17, dtype=dtype, device=dev), 32),
        "nhwc": (_randn(2, 64, 33, 17, dtype=dtype, device=dev).to(memory_format=torch.channels_last), 32),
        "c6_g3_odd": (_randn(3, 6, 7, 9, dtype=dtype, device=dev), 3),
        "c12_g4_nhwc": (_randn(1, 12, 7, 9, dtype=dtype, device=dev).to(memory_format=torch.channels_last), 4),
        "c20_g2_nhwc": (_randn(2, 20, 15, 15, dtype=dtype, device=dev).to(memory_format=torch.channels_last), 2),
        "1d": (_randn(3, 24, 1001, dtype=dtype, device=dev), 8),
        "3d_channels_last": (_randn(2, 16, 5, 6, 7, dtype=dtype, device=dev).to(memory_format=torch.channels_last_3d), 4),
        "misaligned": (_randn(2 * 64 * 16 * 16 + 1, dtype=dtype, device=dev)[1:].view(2, 64, 16, 16), 32),
        "channel_slice": (_randn(2, 40, 9, 9, dtype=dtype, device=dev)[:, 4:36], 8),
        "big_group_split": (_randn(1, 64, 96, 96, dtype=dtype, device=dev), 4),
    }


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "layout", ["nchw", "nhwc", "c6_g3_odd", "c12_g4_nhwc", "c20_g2_nhwc", "1d", "3d_channels_last", "misaligned", "channel_slice", "big_group_split"]
)
@pytest.mark.gpu
@requires_cuda
def test_cuda_forward(seed, layout, dtype, silu):
    x, groups = _cuda_layouts(dtype)[layout]
    w, b = _affine(x.shape[1], dtype, "cuda")
    activation = "silu" if silu else None
    with fastdiff.trace_dispatch() as calls:
        y = group_norm(x, groups, w, b, EPS, activation, backend="cuda")
    assert calls == [("group_norm", "cuda")]
    _check_output(y, x, groups, w, b, activation, what=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "misaligned", "big_group_split"])
@pytest.mark.gpu
@requires_cuda
def test_cuda_raw_op_statistics(seed, layout, dtype):
    from fastdiff.ops.group_norm import _register_cuda_op

    _register_cuda_op()
    x, groups = _cuda_layouts(dtype)[layout]
    w, b = _affine(x.shape[1], dtype, "cuda")
    y, mean, rstd = torch.ops.fastdiff.group_norm_fwd_cuda(x, w, b, None, groups, EPS, "none")
    _check_stats(mean, rstd, x, groups)
    _check_output(y, x, groups, w, b, None)
    input_bias = _randn(*x.shape[:2], dtype=dtype, device="cuda")
    y, mean, rstd = torch.ops.fastdiff.group_norm_fwd_cuda(x, w, b, input_bias, groups, EPS, "silu")
    _check_stats(mean, rstd, x, groups, input_bias=input_bias)
    _check_output(y, x, groups, w, b, "silu", input_bias=input_bias)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
@requires_cuda
def test_cuda_sd_shapes_fp16(seed, shape, channels_last):
    x = _randn(*shape, dtype=torch.float16, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = _affine(shape[1], torch.float16, "cuda")
    y = group_norm(x, 32, w, b, EPS, "silu", backend="cuda")
    _check_output(y, x, 32, w, b, "silu", what=str(shape))


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.gpu
@requires_cuda
def test_cuda_gradients(seed, channels_last, activation):
    x = _randn(2, 12, 9, 11, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = _affine(12, torch.float32, "cuda")
    dy = torch.randn_like(x)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    group_norm(leaves[0], 3, leaves[1], leaves[2], EPS, activation, backend="cuda").backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    group_norm_ref(ref_leaves[0], 3, ref_leaves[1], ref_leaves[2], EPS, activation).backward(dy.double())
    for name, got, ref in zip(("dx", "dw", "db"), leaves, ref_leaves):
        assert_fp32_close(got.grad, ref.grad, rtol=1e-4, what=name)


@pytest.mark.gpu
@requires_cuda
def test_cuda_opcheck(seed):
    from fastdiff.ops.group_norm import _register_cuda_op

    _register_cuda_op()
    for x in (_randn(2, 6, 5, 7, device="cuda"), _randn(2, 16, 4, 6, dtype=torch.float16, device="cuda").to(memory_format=torch.channels_last)):
        w, b = _affine(x.shape[1], x.dtype, "cuda")
        input_bias = _randn(*x.shape[:2], dtype=x.dtype, device="cuda")
        for ib in (None, input_bias):
            torch.library.opcheck(torch.ops.fastdiff.group_norm_fwd_cuda.default, (x, w, b, ib, 2, EPS, "silu"))


@pytest.mark.gpu
@requires_cuda
def test_cuda_binding_rejects_bad_arguments(seed):
    from fastdiff.ops.group_norm import _register_cuda_op

    _register_cuda_op()
    op = torch.ops.fastdiff.group_norm_fwd_cuda
    x = _randn(2, 6, 5, 7, device="cuda")
    w, b = _affine(6, torch.float32, "cuda")
    ib = _randn(2, 6, device="cuda")
    with pytest.raises(RuntimeError, match="activation must be 'none' or 'silu'"):
        op(x, w, b, None, 3, EPS, "relu")
    with pytest.raises(RuntimeError, match="num_groups"):
        op(x, w, b, None, 4, EPS, "none")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(x, w[:5], b, None, 3, EPS, "none")
    with pytest.raises(RuntimeError, match="bias dtype"):
        op(x, w, b.half(), None, 3, EPS, "none")
    with pytest.raises(RuntimeError, match=r"input_bias must have shape \(N, C\)"):
        op(x, w, b, ib[:, :5], 3, EPS, "none")
    with pytest.raises(RuntimeError, match="input_bias dtype"):
        op(x, w, b, ib.half(), 3, EPS, "none")
    with pytest.raises(RuntimeError, match="input_bias is on cpu"):
        op(x, w, b, ib.cpu(), 3, EPS, "none")
