"""The ``fastdiff`` command line: ``generate``, ``bench``, ``info`` and ``train``.

    fastdiff generate                      # a grid of digits from the embedded model, in seconds on a CPU
    fastdiff generate --model PATH --prompt "a red fox" --steps 30 --scheduler dpm++ --guidance 7.5
    torchrun --nproc-per-node 2 -m fastdiff generate --model PATH --prompts-file prompts.txt --out-dir imgs
    fastdiff bench [--json | --csv]        # kernel microbenchmarks beside their baselines, plus a pipeline
    fastdiff info                          # device, versions, every op's backends and the reasons for the others
    fastdiff train [--steps N]             # reproduce the embedded model (see fastdiff.train)

A bad argument gets one line on stderr (``fastdiff generate: error: ...``) and exit status 2, never a
traceback. Under ``torchrun`` the images are split across ranks in whole batches; image i is always
seeded ``--seed + i``, so every image equals the one a single process makes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import List, Optional

from fastdiff.default_model import DEFAULT_MODEL

EXIT_BAD_ARGUMENT = 2

# Short scheduler names -> fastdiff class names (class names are accepted too).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
UNCONDITIONAL_PIPELINES = ("DDIMPipeline", "DDPMPipeline")
DTYPES = ("float32", "float16", "bfloat16")
OPS = ("group_norm", "attention", "geglu", "scheduler_step")


class CLIError(Exception):
    """A bad argument or an input that cannot run: printed as one line, exit status 2."""

    def __init__(self, message: str, prog: Optional[str] = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), so every bad argument reads the same."""

    def error(self, message):
        raise CLIError(message if message.startswith("argument") else f"{message} (see {self.prog} --help)", self.prog)


# ----------------------------------------------------------------------------- argument checks


def check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA GPU is available to this torch ({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return device


def check_backend(spec: Optional[str]) -> Optional[dict]:
    """``--backend NAME`` or ``op=NAME,op=NAME`` -> keyword arguments of fastdiff.use_backend."""
    if spec is None:
        return None
    from fastdiff.backends import AUTO, get_dispatcher

    ops = {name: set(get_dispatcher(name).backends) | {AUTO} for name in OPS}
    if "=" not in spec:
        known = set().union(*ops.values())
        if spec not in known:
            raise CLIError(f"--backend: unknown backend {spec!r}; expected one of {sorted(known)} or op=NAME pairs")
        return {"name": spec}
    choice = {}
    for part in spec.split(","):
        op, _, name = part.partition("=")
        op, name = op.strip(), name.strip()
        if op not in ops:
            raise CLIError(f"--backend: unknown op {op!r}; expected one of {sorted(ops)}")
        if name not in ops[op]:
            raise CLIError(f"--backend: op {op!r} has no backend {name!r}; it has {sorted(ops[op])}")
        choice[op] = name
    return choice


def check_scheduler(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if name in SCHEDULERS.values():
        return name
    raise CLIError(f"--scheduler: unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)} (or their class names)")


def check_model_folder(path: str) -> str:
    if not os.path.exists(path):
        raise CLIError(f"--model: no such folder {path!r}")
    if not os.path.isdir(path):
        raise CLIError(f"--model: {path!r} is a file; expected a diffusers pipeline folder holding model_index.json")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise CLIError(f"--model: {path!r} has no model_index.json; expected a diffusers pipeline folder")
    return path


def read_prompts(args) -> Optional[List[str]]:
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise CLIError("--prompt and --prompts-file: give one or the other")
        if not os.path.isfile(args.prompts_file):
            raise CLIError(f"--prompts-file: no such file {args.prompts_file!r}")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise CLIError(f"--prompts-file: {args.prompts_file!r} holds no prompt (one per line)")
        return prompts
    return None if args.prompt is None else [args.prompt]


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
        return value

    parse.__name__ = name
    return parse


# ----------------------------------------------------------------------------- generate


def _model_index(folder: str) -> dict:
    import json

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        return json.load(f)


def _plan(args, pipeline_class: str, prompts: Optional[List[str]]):
    """Validate generate's arguments against the model; return the list of items (prompt or None)."""
    unconditional = pipeline_class in UNCONDITIONAL_PIPELINES
    if unconditional:
        if prompts is not None or args.negative_prompt is not None:
            which = "--negative-prompt" if prompts is None else ("--prompts-file" if args.prompts_file else "--prompt")
            raise CLIError(f"{which}: the model in {args.model!r} is unconditional ({pipeline_class}) and takes no prompt")
        if args.guidance is not None:
            raise CLIError(f"--guidance: the model in {args.model!r} is unconditional ({pipeline_class}); guidance needs a prompt")
        if args.height is not None or args.width is not None:
            raise CLIError(f"--height/--width: {pipeline_class} makes images of the size its UNet was trained on")
        if args.scheduler not in (None, "DDIMScheduler", "DDPMScheduler"):
            raise CLIError(f"--scheduler: the unconditional {pipeline_class} runs 'ddim' or 'ddpm', got {args.scheduler!r}")
        return [None] * args.num_images
    if prompts is None:
        raise CLIError(f"--prompt: the model in {args.model!r} ({pipeline_class}) needs a prompt (or --prompts-file)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise CLIError(f"--{name}: expected a multiple of 8, got {value}")
    return [p for p in prompts for _ in range(args.num_images)]


def load_pipeline(args, pipeline_class: str):
    import torch

    from fastdiff.pipelines import DDPMPipeline, DiffusionPipeline

    dtype = getattr(torch, args.dtype)
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
    if pipeline_class in UNCONDITIONAL_PIPELINES:
        if args.scheduler == "DDPMScheduler" and pipeline_class != "DDPMPipeline":
            from fastdiff.schedulers import DDPMScheduler

            pipe = DDPMPipeline(unet=pipe.unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    elif args.scheduler is not None:
        import fastdiff.schedulers

        pipe.scheduler = getattr(fastdiff.schedulers, args.scheduler).from_config(pipe.scheduler.config)
    return pipe.to(args.device)


def _call(pipe, items, seeds, args, unconditional):
    """Run the pipeline on one batch of items, image j seeded ``seeds[j]``; returns PIL images."""
    import torch

    generators = [torch.Generator(args.device).manual_seed(s) for s in seeds]
    if unconditional:
        kwargs = dict(batch_size=len(items), generator=generators)
        if args.steps is not None:
            kwargs["num_inference_steps"] = args.steps
        return pipe(**kwargs).images
    kwargs = dict(prompt=list(items), generator=generators)
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = [args.negative_prompt] * len(items)
    for key, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance), ("height", args.height), ("width", args.width)):
        if value is not None:
            kwargs[key] = value
    return pipe(**kwargs).images


def generate(args) -> int:
    import torch

    import fastdiff
    from fastdiff.train import distributed_context, rank_device

    args.model = check_model_folder(args.model)
    args.scheduler = check_scheduler(args.scheduler)
    args.device = str(check_device(args.device))
    backend = check_backend(args.backend)
    prompts = read_prompts(args)
    index = _model_index(args.model)
    pipeline_class = index.get("_class_name", "?")
    items = _plan(args, pipeline_class, prompts)
    unconditional = pipeline_class in UNCONDITIONAL_PIPELINES

    rank, world = distributed_context()
    args.device = str(rank_device(args.device, rank))
    pipe = load_pipeline(args, pipeline_class)
    pipe.set_progress_bar_config(disable=rank != 0 or args.no_progress, desc=f"generate ({pipeline_class})")
    if args.no_cuda_graph:
        pipe.enable_cuda_graph(False)

    # Whole batches go round-robin to the ranks, so a batch holds the same images in any run.
    batches = [list(range(i, min(i + args.batch_size, len(items)))) for i in range(0, len(items), args.batch_size)]
    mine = batches[rank::world]
    images = {}
    began = time.perf_counter()
    forced = contextlib.nullcontext()
    if backend is not None:
        forced = fastdiff.use_backend(backend["name"]) if "name" in backend else fastdiff.use_backend(**backend)
    with forced, fastdiff.trace_dispatch() as calls:
        for batch in mine:
            seeds = [args.seed + j for j in batch]
            for j, image in zip(batch, _call(pipe, [items[j] for j in batch], seeds, args, unconditional)):
                images[j] = image
    seconds = time.perf_counter() - began
    steps = len(pipe.scheduler.timesteps)  # denoising steps of the last call (UNet evaluations per image)

    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(images, gathered, dst=0)
        if rank == 0:
            images = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        ordered = [images[j] for j in range(len(items))]
        _write_outputs(ordered, args)
        counts = {}
        for op, name in calls:
            counts[f"{op}:{name}"] = counts.get(f"{op}:{name}", 0) + 1
        ran = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none (no fastdiff op ran)"
        per_step = seconds / max(1, len(mine) * steps)
        print(f"kernels (rank 0): {ran}")
        print(
            f"{len(items)} image(s) from {pipeline_class} on {args.device} ({args.dtype}), {world} process(es): "
            f"{seconds:.2f} s on rank 0, {per_step * 1000:.1f} ms per denoising step of a batch of up to {args.batch_size}"
            + ("" if not args.no_cuda_graph else "; CUDA graphs off")
        )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _write_outputs(images, args) -> None:
    import torch
    import numpy as np

    from fastdiff.quality import save_grid

    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for j, image in enumerate(images):
            image.save(os.path.join(args.out_dir, f"{j:05d}.png"))
        print(f"wrote {len(images)} image(s) to {args.out_dir}/")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        arrays = [np.asarray(image.convert("L") if image.mode == "L" else image.convert("RGB")) for image in images]
        tensor = torch.stack([torch.from_numpy(a.copy()) for a in arrays]).float() / 255
        tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
        scale = max(1, 64 // tensor.shape[-1])  # small images (the 16x16 digits) are enlarged, nearest
        nrow = max(1, int(len(images) ** 0.5 + 0.999))
        save_grid(tensor, args.out, nrow=nrow, scale=scale)
        print(f"wrote {args.out}")


# ----------------------------------------------------------------------------- info, bench, train


def info(args) -> int:
    from fastdiff.benchmark import info_report

    print(info_report())
    return 0


def bench(args) -> int:
    from fastdiff.benchmark import run_benchmarks

    args.device = str(check_device(args.device))
    if args.json and args.csv:
        raise CLIError("--json and --csv: choose one output format")
    return run_benchmarks(device=args.device, fmt="json" if args.json else "csv" if args.csv else "table",
                          quick=args.quick, out=args.out, ops=args.ops)


def train(args) -> int:
    from fastdiff.train import config_from_args, train as run_training

    check_device(args.device)
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.image_size % 8:
        raise CLIError(f"--image-size: expected a multiple of 8, got {args.image_size}")
    run_training(config_from_args(args))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # started by torchrun
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- parser and main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdiff", description="fastdiff: diffusion pipelines on fused Triton and CUDA kernels.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{generate,bench,info,train}", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser("generate", help="generate images (default: digits from the embedded model)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="a diffusers pipeline folder (default: the embedded digits model)")
    g.add_argument("--prompt", default=None, help="text prompt (Stable Diffusion / SDXL folders)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--prompts-file", default=None, help="one prompt per line; split across torchrun ranks")
    g.add_argument("--steps", type=_positive("steps"), default=None, help="denoising steps (default: the pipeline's, 50)")
    g.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)} (default: the folder's)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (prompted models)")
    g.add_argument("--seed", type=int, default=0, help="image i is seeded SEED + i (default %(default)s)")
    g.add_argument("--height", type=_positive("height"), default=None, help="multiple of 8 (prompted models)")
    g.add_argument("--width", type=_positive("width"), default=None, help="multiple of 8 (prompted models)")
    g.add_argument("--num-images", type=_positive("num_images"), default=16, help="images (per prompt) (default %(default)s)")
    g.add_argument("--batch-size", type=_positive("batch_size"), default=16, help="images per pipeline call (default %(default)s)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--backend", default=None, help="force kernels: a name (triton, cuda, sdpa, reference) or op=name,...")
    g.add_argument("--no-cuda-graph", action="store_true", help="never capture the denoising loop in a CUDA graph")
    g.add_argument("--out", default="fastdiff_samples.png", help="the grid PNG (default %(default)s)")
    g.add_argument("--out-dir", default=None, help="also write every image as DIR/00000.png, ...")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=generate)

    b = sub.add_parser("bench", help="kernel microbenchmarks beside their baselines, and a pipeline's speed")
    b.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    b.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    b.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    b.add_argument("--quick", action="store_true", help="fewest repeats (a smoke run)")
    b.add_argument("--ops", default=None, help="comma list of group_norm_silu, attention, scheduler_step, geglu, pipeline")
    b.add_argument("--out", default=None, help="also append the rows as JSON lines to this file")
    b.set_defaults(func=bench)

    i = sub.add_parser("info", help="device, versions, each op's backends and why the others cannot run")
    i.set_defaults(func=info)

    from fastdiff.train import add_arguments

    t = sub.add_parser("train", help="train the digits model (reproduces the embedded weights from a seed)")
    add_arguments(t)
    t.set_defaults(func=train)
    return parser


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _version() -> str:
    import fastdiff

    return f"fastdiff {fastdiff.__version__}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    prog = "fastdiff"
    try:
        args = parser.parse_args(argv)
        prog = f"fastdiff {args.command}"
        return args.func(args)
    except CLIError as error:
        print(f"{error.prog or prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    except (ValueError, FileNotFoundError, ImportError) as error:
        # Errors raised by the library for inputs it cannot run (a folder that is not a pipeline, a
        # forced backend that cannot run these tensors, a missing extra): one line, as above.
        message = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
