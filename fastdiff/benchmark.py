"""``fastdiff bench`` and ``fastdiff info``: kernel microbenchmarks beside their baselines, and the
state of every op's backends on this machine.

Each benchmark runs every fastdiff backend that can run its inputs on this device (on a CPU that is
the reference twin and SDPA; Triton on CUDA, and under TRITON_INTERPRET only when asked) beside the
baselines measured in the same run: the plain-PyTorch eager sequence a diffusers model runs,
``torch.compile`` of it (on CUDA, or with ``--compile``: Inductor's CPU compile takes longer than
the whole CPU run), and diffusers itself where it is installed. The last benchmark is a whole
pipeline: the embedded digits model through fastdiff's DDIMPipeline and, beside it, through
diffusers' DDIMPipeline loaded from the same folder.

The benchmarks live in the installed package (the scripts under benchmarks/ are the larger GPU
suite). On a CPU the shapes are small and the whole run takes well under a minute.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

BENCHES = ("group_norm_silu", "attention", "scheduler_step", "geglu", "pipeline")


# ----------------------------------------------------------------------------- environment


def git_commit() -> str:
    """HEAD's short hash of a source checkout; FASTDIFF_COMMIT when set; else 'unknown' (a wheel)."""
    if os.environ.get("FASTDIFF_COMMIT"):
        return os.environ["FASTDIFF_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed (any metadata error means the same here)
        return None


def environment() -> dict:
    """Device (card or CPU), versions, commit and UTC date: recorded with every result."""
    import fastdiff

    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "fastdiff": fastdiff.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    return env


# ----------------------------------------------------------------------------- timing


def measure(providers: Dict[str, Callable[[], object]], device: torch.device, min_rounds: int = 5, max_rounds: int = 200,
            budget_seconds: float = 0.5) -> Dict[str, dict]:
    """p20/p50/p80 wall time in ms of each provider, interleaved: every round calls each provider once,
    so a noisy (shared) machine slows all providers alike. One untimed warm-up call each first (it
    compiles what needs compiling); a provider that raises is reported with its error, not timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results: Dict[str, dict] = {}
    live = {}
    for name, fn in providers.items():
        try:
            fn()
            sync()
            live[name] = fn
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            message = str(error).splitlines()[0] if str(error) else ""
            results[name] = {"error": f"{type(error).__name__}: {message}"}
    times: Dict[str, List[float]] = {name: [] for name in live}
    end = time.perf_counter() + budget_seconds
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() < end):
        for name, fn in live.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1000)
        rounds += 1
    for name, t in times.items():
        q = statistics.quantiles(t, n=10, method="inclusive")
        results[name] = {"p20_ms": q[1], "p50_ms": statistics.median(t), "p80_ms": q[7], "reps": len(t)}
    return {name: results[name] for name in providers}


def _runnable_backends(dispatcher, inputs, device: torch.device, names) -> List[str]:
    """fastdiff backends that can run ``inputs`` here; the Triton interpreter is a test tool, not a speed."""
    from fastdiff.backends import triton_interpret_enabled

    keep = []
    for name in names:
        if dispatcher.backends[name].not_supported_reasons(inputs):
            continue
        if device.type == "cpu" and name.startswith("triton") and triton_interpret_enabled():
            continue
        keep.append(name)
    return keep


# ----------------------------------------------------------------------------- the benchmarks
# Each returns (shape label, {provider: zero-argument callable}, baseline provider name).


def _group_norm_silu(device, dtype, small, compile_baselines):
    from fastdiff.backends import get_dispatcher
    from fastdiff.ops import group_norm
    from fastdiff.ops.group_norm import _inputs as gn_inputs

    shape = (2, 64, 32, 32) if small else (2, 320, 64, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    w, b = torch.randn(shape[1], generator=g).to(device, dtype), torch.randn(shape[1], generator=g).to(device, dtype)

    def eager():  # diffusers' ResnetBlock2D: nn.GroupNorm then SiLU, two passes
        return F.silu(F.group_norm(x, 32, w, b, 1e-5))

    providers = {"torch-eager (diffusers)": eager}
    if compile_baselines:
        providers["torch.compile(eager)"] = torch.compile(eager)
    dispatcher = get_dispatcher("group_norm")
    inputs = gn_inputs(x, 32, w, b, 1e-5, "silu")
    for name in _runnable_backends(dispatcher, inputs, device, dispatcher.backends):
        providers[f"fastdiff-{name}"] = (lambda n: lambda: group_norm(x, 32, w, b, 1e-5, activation="silu", backend=n))(name)
    return "x".join(map(str, shape)), providers, "torch-eager (diffusers)"


def _attention(device, dtype, small, compile_baselines):
    from fastdiff.backends import get_dispatcher
    from fastdiff.ops import attention
    from fastdiff.ops.attention import _inputs as attn_inputs

    shape = (2, 4, 256, 40) if small else (2, 8, 4096, 40)  # SD 1.5's first self-attention has head dim 40
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))

    def math_attention():  # diffusers' AttnProcessor (pre-2.0): baddbmm, softmax, bmm
        scores = (q @ k.transpose(-1, -2)) * shape[-1] ** -0.5
        return scores.softmax(-1) @ v

    providers = {
        "torch-math (diffusers AttnProcessor)": math_attention,
        "torch-sdpa (diffusers AttnProcessor2_0)": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    if compile_baselines:
        providers["torch.compile(math)"] = torch.compile(math_attention)
    dispatcher = get_dispatcher("attention")
    inputs = attn_inputs(q, k, v, None, None)
    for name in _runnable_backends(dispatcher, inputs, device, dispatcher.backends):
        providers[f"fastdiff-{name}"] = (lambda n: lambda: attention(q, k, v, backend=n))(name)
    return "x".join(map(str, shape)), providers, "torch-sdpa (diffusers AttnProcessor2_0)"


def _scheduler_step(device, dtype, small, compile_baselines):
    from fastdiff.schedulers import DDIMScheduler

    shape = (1, 4, 32, 32) if small else (1, 4, 64, 64)
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=g).to(device, dtype)
    model_output = torch.randn((2 * shape[0],) + shape[1:], generator=g).to(device, dtype)
    ours = DDIMScheduler(**sd)
    ours.set_timesteps(30, device=device)
    t = ours.timesteps[10]

    def eager_cfg(step):
        uncond, cond = model_output.chunk(2)
        return step(uncond + 7.5 * (cond - uncond), t, sample).prev_sample

    def fastdiff_fused():  # guidance folded into the step (one launch on CUDA)
        ours._step_index = None
        return ours.step(model_output, t, sample, guidance_scale=7.5).prev_sample

    providers = {"fastdiff-eager (chunk, cfg, step)": lambda: eager_cfg(ours.step)}
    baseline = "fastdiff-eager (chunk, cfg, step)"
    try:
        import diffusers

        theirs = diffusers.DDIMScheduler(**sd)
        theirs.set_timesteps(30, device=device)
        providers["diffusers (chunk, cfg, step)"] = lambda: eager_cfg(theirs.step)
        baseline = "diffusers (chunk, cfg, step)"
    except ImportError:
        pass
    providers["fastdiff step(guidance_scale=)"] = fastdiff_fused
    return "x".join(map(str, shape)) + " ddim+cfg", providers, baseline


def _geglu(device, dtype, small, compile_baselines):
    from fastdiff.backends import get_dispatcher
    from fastdiff.ops import geglu
    from fastdiff.ops.geglu import _inputs as geglu_inputs

    shape = (2, 256, 2 * 640) if small else (2, 4096, 2 * 2560)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def eager():  # diffusers' GEGLU after its projection: chunk, gelu, multiply
        hidden, gate = x.chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    providers = {"torch-eager (diffusers GEGLU)": eager}
    if compile_baselines:
        providers["torch.compile(eager)"] = torch.compile(eager)
    dispatcher = get_dispatcher("geglu")
    inputs = geglu_inputs(x)
    for name in _runnable_backends(dispatcher, inputs, device, dispatcher.backends):
        providers[f"fastdiff-{name}"] = (lambda n: lambda: geglu(x, backend=n))(name)
    return "x".join(map(str, shape)), providers, "torch-eager (diffusers GEGLU)"


def _pipeline(device, dtype, small, compile_baselines, quick=False):
    """The embedded digits model, 16 images x 20 DDIM steps (4 x 5 with --quick), through fastdiff and through diffusers."""
    from fastdiff.default_model import DEFAULT_MODEL
    from fastdiff.pipelines import DDIMPipeline

    steps, batch = (5, 4) if quick else (20, 16)
    ours = DDIMPipeline.from_pretrained(DEFAULT_MODEL, torch_dtype=dtype).to(device)
    ours.set_progress_bar_config(disable=True)

    def run(pipe):
        return lambda: pipe(batch_size=batch, generator=torch.Generator(device).manual_seed(0), num_inference_steps=steps, output_type="pt")

    providers = {}
    baseline = "fastdiff DDIMPipeline"
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()  # no loading bar or accelerate advice in the table
        diffusers.utils.logging.disable_progress_bar()
        theirs = diffusers.DDIMPipeline.from_pretrained(DEFAULT_MODEL).to(device, dtype)
        theirs.set_progress_bar_config(disable=True)
        providers["diffusers DDIMPipeline"] = run(theirs)
        baseline = "diffusers DDIMPipeline"
    except ImportError:
        pass
    providers["fastdiff DDIMPipeline"] = run(ours)
    size = ours.unet.config.sample_size
    return f"digits {batch}x{size}x{size} {steps} steps", providers, baseline


BENCH_FUNCTIONS = {
    "group_norm_silu": _group_norm_silu,
    "attention": _attention,
    "scheduler_step": _scheduler_step,
    "geglu": _geglu,
    "pipeline": _pipeline,
}


def collect(device: str = "cpu", ops: Optional[List[str]] = None, quick: bool = False, compile_baselines: Optional[bool] = None) -> List[dict]:
    """Run the benchmarks; one row per (benchmark, provider) with p20/p50/p80 and the speedup over the baseline."""
    dev = torch.device(device)
    small = dev.type == "cpu"
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if compile_baselines is None:
        compile_baselines = dev.type == "cuda"
    env = environment()
    rows = []
    for bench in ops or BENCHES:
        extra = {"quick": quick} if bench == "pipeline" else {}
        shape, providers, baseline = BENCH_FUNCTIONS[bench](dev, dtype, small, compile_baselines, **extra)
        if bench == "pipeline":
            results = measure(providers, dev, min_rounds=2 if quick else 3, budget_seconds=0.0)
        else:
            results = measure(providers, dev, min_rounds=3 if quick else 10, budget_seconds=0.0 if quick else 0.5)
        base = results.get(baseline, {}).get("p50_ms")
        for name, r in results.items():
            row = {"bench": bench, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "provider": name, **r}
            if "p50_ms" in r and base:
                row["speedup"] = round(base / r["p50_ms"], 3)
                row["baseline"] = baseline
            row.update({k: env[k] for k in ("device", "torch", "triton", "diffusers", "commit", "date")})
            rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    header = ("bench", "shape", "provider", "p50 ms", "p20-p80 ms", "vs baseline")
    body = []
    for r in rows:
        if "error" in r:
            body.append((r["bench"], r["shape"], r["provider"], "-", r["error"][:40], "-"))
            continue
        body.append((
            r["bench"], r["shape"], r["provider"], f"{r['p50_ms']:.3f}", f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            "baseline" if r["provider"] == r.get("baseline") else (f"{r['speedup']:.2f}x" if "speedup" in r else "-"),
        ))
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in body]
    if rows:
        r = rows[0]
        lines.append(f"device: {r['device']}; torch {r['torch']}, triton {r['triton']}, diffusers {r['diffusers']}; commit {r['commit']}; {r['date']}")
        lines.append("'vs baseline' = baseline p50 / provider p50 (above 1: faster than the baseline)")
    return "\n".join(lines)


def run_benchmarks(device: str = "cpu", fmt: str = "table", quick: bool = False, out: Optional[str] = None,
                   ops: Optional[str] = None, compile_baselines: Optional[bool] = None) -> int:
    names = [o.strip() for o in ops.split(",")] if ops else list(BENCHES)
    unknown = [n for n in names if n not in BENCH_FUNCTIONS]
    if unknown:
        raise ValueError(f"--ops: unknown benchmark(s) {unknown}; expected some of {list(BENCHES)}")
    rows = collect(device, names, quick, compile_baselines)
    if fmt == "json":
        for row in rows:
            print(json.dumps(row))
    elif fmt == "csv":
        buffer = io.StringIO()
        keys = sorted({k for r in rows for k in r}, key=lambda k: (list(rows[0]).index(k) if k in rows[0] else 99, k))
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        print(buffer.getvalue(), end="")
    else:
        print(format_table(rows))
    if out:
        with open(out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


# ----------------------------------------------------------------------------- info


def _sample_inputs(device: torch.device) -> Dict[str, tuple]:
    """Small, typical inputs of each op on ``device``, to ask every backend for its reasons."""
    from fastdiff.ops.scheduler_step import ddim_coeffs
    from fastdiff.schedulers import DDIMScheduler

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 16, 16, generator=g).to(device, dtype)
    q = torch.randn(1, 2, 64, 40, generator=g).to(device, dtype)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    coeffs = ddim_coeffs(scheduler.alphas_cumprod, scheduler.timesteps, final_alpha_cumprod=float(scheduler.final_alpha_cumprod), device=device)
    sample = torch.randn(1, 4, 8, 8, generator=g).to(device, dtype)
    return {
        "group_norm": ((x, 32), {"activation": "silu"}),
        "attention": ((q, q, q), {}),
        "geglu": ((torch.randn(1, 64, 2 * 160, generator=g).to(device, dtype),), {}),
        "scheduler_step": ((sample, torch.cat([sample, sample]), coeffs, torch.tensor(0, device=device)), {"guidance_scale": 7.5}),
    }


def info_report() -> str:
    import fastdiff
    from fastdiff import _extension
    from fastdiff.backends import ENV_VAR, triton_available, triton_interpret_enabled

    env = environment()
    lines = ["fastdiff " + env["fastdiff"] + f" at {os.path.dirname(os.path.abspath(fastdiff.__file__))}"]
    lines.append(f"device: {env['device']}" + (f" ({env['capability']})" if "capability" in env else ""))
    lines.append(
        f"versions: python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"diffusers {env['diffusers']}, transformers {env['transformers']}; commit {env['commit']}"
    )
    lines.append(
        f"triton: {'importable' if triton_available() else 'not importable'}"
        f"{', TRITON_INTERPRET=1 (kernels run on the CPU interpreter)' if triton_interpret_enabled() else ''}; "
        f"cache: {os.environ.get('TRITON_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.triton', 'cache')}"
    )
    reasons = _extension.extension_reasons()
    try:
        build_dir = _extension.build_directory()
    except RuntimeError as error:
        build_dir = f"none here ({error})"
    lines.append(f"CUDA extension: {'usable' if not reasons else 'not usable: ' + '; '.join(reasons)}; JIT build directory: {build_dir}")
    lines.append(f"{ENV_VAR}={os.environ.get(ENV_VAR, '(unset: auto)')}")
    from fastdiff.default_model import DEFAULT_MODEL

    lines.append(f"default model: {DEFAULT_MODEL}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines.append(f"\nbackends of each op on {device.type} inputs (first backend with no reasons runs under auto):")
    for op, (args, kwargs) in _sample_inputs(device).items():
        lines.append(fastdiff.explain_dispatch(op, *args, **kwargs))
    return "\n".join(lines)

