"""``DiffusionPipeline``: loading, saving and moving diffusers-format pipeline folders.

A pipeline folder holds ``model_index.json`` and one subfolder per component::

    {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
     "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
     "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [null, null],
     "feature_extractor": [null, null], "requires_safety_checker": true}

* ``["diffusers", X]`` entries load fastdiff's class of the same name (models and schedulers);
* ``["transformers", X]`` entries load ``transformers.X`` (the optional ``fastdiff[text]`` extra);
* ``["stable_diffusion", "StableDiffusionSafetyChecker"]`` loads fastdiff's own safety checker;
* ``[null, null]`` entries are skipped (the component is ``None``);
* other entries (``requires_safety_checker``, ``force_zeros_for_empty_prompt``) are pipeline options.

Folders are only read from the local disk: fastdiff never downloads.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from fastdiff.models.configuration_utils import FrozenDict
from fastdiff.utils.outputs import BaseOutput

logger = logging.getLogger(__name__)

MODEL_INDEX_NAME = "model_index.json"

# The diffusers release whose folder format fastdiff writes (as `_diffusers_version`).
DIFFUSERS_COMPAT_VERSION = "0.42.1"

#: fastdiff pipeline classes by name (the `_class_name` of model_index.json).
PIPELINE_MODULES = {
    "DDPMPipeline": "fastdiff.pipelines.pipeline_ddpm",
    "DDIMPipeline": "fastdiff.pipelines.pipeline_ddim",
    "StableDiffusionPipeline": "fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "StableDiffusionXLPipeline": "fastdiff.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
}

#: diffusers class names fastdiff implements -> the fastdiff module that defines them.
FASTDIFF_COMPONENTS = {
    "UNet2DModel": "fastdiff.models",
    "UNet2DConditionModel": "fastdiff.models",
    "AutoencoderKL": "fastdiff.models",
    "DDIMScheduler": "fastdiff.schedulers",
    "DDPMScheduler": "fastdiff.schedulers",
    "PNDMScheduler": "fastdiff.schedulers",
    "EulerDiscreteScheduler": "fastdiff.schedulers",
    "EulerAncestralDiscreteScheduler": "fastdiff.schedulers",
    "DPMSolverMultistepScheduler": "fastdiff.schedulers",
    "HeunDiscreteScheduler": "fastdiff.schedulers",
    "LMSDiscreteScheduler": "fastdiff.schedulers",
    "UniPCMultistepScheduler": "fastdiff.schedulers",
    "StableDiffusionSafetyChecker": "fastdiff.pipelines.stable_diffusion.safety_checker",
}

# Libraries whose classes fastdiff maps to its own (diffusers' old folders name the safety checker's
# pipeline module as its library).
_FASTDIFF_LIBRARIES = ("diffusers", "fastdiff", "stable_diffusion")

TEXT_EXTRA_HINT = "pip install 'fastdiff[text]'"


@dataclass
class ImagePipelineOutput(BaseOutput):
    """Output of the unconditional image pipelines.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the images, as PIL images,
            a (B, H, W, C) float array in [0, 1], or a (B, C, H, W) tensor in [0, 1] (``output_type="pt"``).
    """

    images: Union[List[Any], np.ndarray, torch.Tensor]


def import_transformers(what: str):
    """``transformers``, or a one-line ImportError naming the ``fastdiff[text]`` extra."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError(f"{what} needs the transformers package: {TEXT_EXTRA_HINT}") from None


def local_pipeline_folder(name_or_path: Union[str, os.PathLike]) -> str:
    """``name_or_path`` if it is a local folder; otherwise a clear error (fastdiff never downloads)."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ValueError(f"pretrained_model_name_or_path: {name} is a file, expected a pipeline folder")
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise FileNotFoundError(
            f"pretrained_model_name_or_path: {name!r} is not a local folder. fastdiff loads pipelines from local "
            f"folders only and never downloads; fetch it first, e.g. `huggingface-cli download {name} "
            f"--local-dir ./{name.split('/')[-1]}` (or diffusers' DiffusionPipeline.download), and pass that folder"
        )
    raise FileNotFoundError(f"pretrained_model_name_or_path: no folder {name}")


def read_model_index(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, MODEL_INDEX_NAME)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(folder, "config.json")):
            hint = " (it holds a config.json: load a single model with e.g. fastdiff.UNet2DModel.from_pretrained)"
        raise FileNotFoundError(f"no {MODEL_INDEX_NAME} in {folder}: expected a diffusers pipeline folder{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(index).__name__}")
    return index


def pipeline_class_by_name(name: str):
    if name not in PIPELINE_MODULES:
        raise ValueError(
            f"model_index.json names the pipeline class {name!r}, which fastdiff does not have; "
            f"fastdiff has {sorted(PIPELINE_MODULES)}"
        )
    return getattr(importlib.import_module(PIPELINE_MODULES[name]), name)


def component_class(name: str, library: str, class_name: str):
    """The class that loads component ``name`` listed as ``[library, class_name]``."""
    if library in _FASTDIFF_LIBRARIES:
        if class_name not in FASTDIFF_COMPONENTS:
            raise ValueError(
                f"component {name!r}: fastdiff has no class {class_name!r} (listed as [{library!r}, {class_name!r}] "
                f"in model_index.json); it has {sorted(FASTDIFF_COMPONENTS)}"
            )
        return getattr(importlib.import_module(FASTDIFF_COMPONENTS[class_name]), class_name)
    if library == "transformers":
        transformers = import_transformers(f"component {name!r} ([transformers, {class_name}])")
        klass = getattr(transformers, class_name, None)
        if klass is None or not hasattr(klass, "from_pretrained"):
            raise ValueError(f"component {name!r}: transformers has no loadable class {class_name!r}")
        return klass
    raise ValueError(
        f"component {name!r}: unknown library {library!r} for class {class_name!r} in model_index.json; "
        "fastdiff loads 'diffusers' and 'transformers' components"
    )


def library_of(component) -> List[Optional[str]]:
    """The ``[library, class]`` entry that model_index.json records for ``component``."""
    if component is None:
        return [None, None]
    klass = type(component)
    top = klass.__module__.split(".")[0]
    if klass.__name__ == "StableDiffusionSafetyChecker" and top == "fastdiff":
        return ["stable_diffusion", klass.__name__]
    if top == "fastdiff":
        return ["diffusers", klass.__name__]
    return [top, klass.__name__]


def _load_component(folder, name, library, class_name, torch_dtype, variant, use_safetensors):
    klass = component_class(name, library, class_name)
    directory = os.path.join(folder, name)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"component {name!r} is listed in model_index.json as [{library!r}, {class_name!r}] but the folder "
            f"{directory} is missing"
        )
    is_module = isinstance(klass, type) and issubclass(klass, torch.nn.Module)
    params = inspect.signature(klass.from_pretrained).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = {}
    if is_module:
        for key, value in (("variant", variant), ("use_safetensors", use_safetensors)):
            if value is not None and (key in params or accepts_any):
                kwargs[key] = value
        if torch_dtype is not None and "torch_dtype" in params:
            kwargs["torch_dtype"] = torch_dtype
    component = klass.from_pretrained(directory, **kwargs)
    if is_module and torch_dtype is not None and "torch_dtype" not in kwargs:
        component = component.to(torch_dtype)
    return component


def _module_components(pipe) -> Dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


class DiffusionPipeline:
    """Base class of fastdiff pipelines: ``from_pretrained``, ``save_pretrained``, ``to``, the progress bar.

    Subclasses declare their components as ``__init__`` arguments (diffusers' names) and list the
    ones that may be ``None`` in ``_optional_components``; other ``__init__`` arguments with
    defaults (``requires_safety_checker``) are pipeline options stored in ``model_index.json``.
    """

    config_name = MODEL_INDEX_NAME
    _optional_components: List[str] = []

    # ------------------------------------------------------------------ config

    @property
    def config(self) -> FrozenDict:
        return self.__dict__.get("_internal_dict", FrozenDict())

    def register_to_config(self, **kwargs) -> None:
        current = dict(self.__dict__.get("_internal_dict", {}))
        current.update(kwargs)
        object.__setattr__(self, "_internal_dict", FrozenDict(current))

    def register_modules(self, **modules) -> None:
        """Set each component as an attribute and record its ``[library, class]`` in the config."""
        for name, module in modules.items():
            self.register_to_config(**{name: library_of(module)})
            object.__setattr__(self, name, module)

    def __setattr__(self, name: str, value) -> None:
        # Reassigning a registered component (pipe.scheduler = ...) keeps model_index.json in step.
        entry = self.__dict__.get("_internal_dict", {}).get(name)
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            self.register_to_config(**{name: library_of(value)})
        object.__setattr__(self, name, value)

    @classmethod
    def _signature_names(cls):
        params = inspect.signature(cls.__init__).parameters
        names = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        components = [n for n in names if params[n].default is inspect.Parameter.empty or n in cls._optional_components]
        options = [n for n in names if n not in components]
        return components, options

    @property
    def components(self) -> Dict[str, Any]:
        """The components by name, so that ``OtherPipeline(**pipe.components)`` builds another pipeline."""
        names, _ = self._signature_names()
        return {name: getattr(self, name, None) for name in names}

    def __repr__(self):
        parts = ", ".join(f"{k}={type(v).__name__ if v is not None else None}" for k, v in self.components.items())
        return f"{type(self).__name__}({parts})"

    # ------------------------------------------------------------ device, dtype

    @property
    def device(self) -> torch.device:
        for module in _module_components(self).values():
            return next(module.parameters()).device
        return torch.device("cpu")

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        for module in _module_components(self).values():
            return next(module.parameters()).dtype
        return torch.float32

    def to(self, *args, **kwargs):
        """``.to(device)``, ``.to(dtype)`` or ``.to(device, dtype)`` (also as keywords) for every module."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.to got unexpected keyword arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)):
                device = arg
            else:
                raise ValueError(f"{type(self).__name__}.to: expected a device and/or a torch.dtype, got {arg!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}.to: dtype must be a floating dtype, got {dtype}")
        for module in _module_components(self).values():
            module.to(device=device, dtype=dtype)
        return self

    # ----------------------------------------------------------- progress bar

    def set_progress_bar_config(self, **kwargs) -> None:
        """Keyword arguments for the tqdm bar over the denoising steps (``disable=True`` hides it)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total=None):
        from tqdm.auto import tqdm

        config = dict(self.__dict__.get("_progress_bar_config", {}))
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("progress_bar needs `iterable` or `total`")

    # -------------------------------------------------------------- VAE controls

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (passes through to ``vae.enable_slicing``)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode large images tile by tile (passes through to ``vae.enable_tiling``)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    @staticmethod
    def numpy_to_pil(images):
        from fastdiff.pipelines.image_processor import numpy_to_pil

        return numpy_to_pil(images)

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True, variant: Optional[str] = None
    ) -> None:
        """Write ``model_index.json`` and one subfolder per component, in diffusers' layout.

        diffusers' ``DiffusionPipeline.from_pretrained`` loads the folder (fastdiff components are
        recorded under their diffusers names).
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: {save_directory} is a file, expected a folder")
        os.makedirs(save_directory, exist_ok=True)
        index = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_COMPAT_VERSION}
        for key, value in self.config.items():
            if not key.startswith("_"):
                index[key] = list(value) if isinstance(value, tuple) else value
        for name, component in self.components.items():
            index[name] = library_of(component)
            if component is None:
                continue
            params = inspect.signature(component.save_pretrained).parameters
            kwargs = {}
            if "safe_serialization" in params:
                kwargs["safe_serialization"] = safe_serialization
            if variant is not None and "variant" in params:
                kwargs["variant"] = variant
            component.save_pretrained(os.path.join(save_directory, name), **kwargs)
        with open(os.path.join(save_directory, MODEL_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        torch_dtype: Optional[torch.dtype] = None,
        variant: Optional[str] = None,
        use_safetensors: Optional[bool] = None,
        **kwargs,
    ):
        """Load a pipeline folder written by diffusers or by fastdiff.

        Args:
            pretrained_model_name_or_path: a local folder holding ``model_index.json``. Hub ids are
                refused with a hint: fastdiff never downloads.
            torch_dtype: floating dtype for every model component (default float32).
            variant: weights variant such as ``"fp16"`` for the model components.
            use_safetensors: ``True`` only safetensors, ``False`` only ``.bin``, ``None`` either.
            kwargs: components that replace the folder's (``scheduler=...``, ``safety_checker=None``),
                and pipeline options (``requires_safety_checker=False``).

        Called on ``DiffusionPipeline``, the class comes from ``_class_name`` in the folder's
        ``model_index.json``; called on a pipeline class, that class is built.
        """
        if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point):
            raise ValueError(f"torch_dtype: expected a floating torch.dtype, got {torch_dtype!r}")
        folder = local_pipeline_folder(pretrained_model_name_or_path)
        index = read_model_index(folder)
        class_name = index.get("_class_name")
        if cls is DiffusionPipeline:
            if not isinstance(class_name, str):
                raise ValueError(f"{os.path.join(folder, MODEL_INDEX_NAME)} has no '_class_name' naming the pipeline")
            pipeline_class = pipeline_class_by_name(class_name)
        else:
            pipeline_class = cls

        components, options = pipeline_class._signature_names()
        unknown = set(kwargs) - set(components) - set(options)
        if unknown:
            raise TypeError(
                f"{pipeline_class.__name__}.from_pretrained got unexpected keyword arguments {sorted(unknown)}; "
                f"its components are {components} and its options {options}"
            )
        extra = [k for k, v in index.items() if not k.startswith("_") and k not in components + options]
        if extra:
            logger.warning(
                "%s lists %s, which %s does not take; they are ignored",
                MODEL_INDEX_NAME,
                extra,
                pipeline_class.__name__,
            )

        init_kwargs = {}
        for name in components:
            if name in kwargs:
                init_kwargs[name] = kwargs.pop(name)
                continue
            entry = index.get(name, "missing")
            if entry == "missing":
                if name in pipeline_class._optional_components:
                    init_kwargs[name] = None
                    continue
                raise ValueError(
                    f"{pipeline_class.__name__} needs the component {name!r}, but {folder}/{MODEL_INDEX_NAME} does "
                    f"not list it (it lists {[k for k in index if not k.startswith('_')]}); pass {name}=... to "
                    "from_pretrained"
                )
            if entry is None or (isinstance(entry, (list, tuple)) and list(entry) == [None, None]):
                init_kwargs[name] = None
                continue
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
                raise ValueError(
                    f"component {name!r} in {MODEL_INDEX_NAME}: expected [library, class_name], got {entry!r}"
                )
            init_kwargs[name] = _load_component(folder, name, entry[0], entry[1], torch_dtype, variant, use_safetensors)
        for name in options:
            if name in kwargs:
                init_kwargs[name] = kwargs.pop(name)
            elif name in index:
                init_kwargs[name] = index[name]

        pipe = pipeline_class(**init_kwargs)
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipe


def warn_old_config(component: str, key: str, found, value, why: str) -> None:
    """One warning naming the config key a pipeline rewrites (as diffusers does silently-ish)."""
    warnings.warn(
        f"{component}.config.{key} is {found!r}; the pipeline uses {key}={value!r} instead, as diffusers does "
        f"({why}). Save the pipeline (save_pretrained) to store the new value.",
        FutureWarning,
        stacklevel=3,
    )


def check_component_type(pipeline: str, name: str, component, expected: tuple) -> None:
    """A concise TypeError when ``component`` is not one of ``expected`` (class names)."""
    if component is None:
        return
    names = {k.__name__ for k in type(component).__mro__}
    if not names & set(expected):
        raise TypeError(f"{pipeline}: {name} must be one of {list(expected)}, got {type(component).__name__}")


# --------------------------------------------------------------------------------------------------
# The graph layer: CUDA-graph captured denoising loop, per-pipeline backend forcing, explain(), compile
# --------------------------------------------------------------------------------------------------

_LOOP_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                   "StableDiffusionXLPipeline")  # fmt: skip


def _with_backend_scope(call):
    """Wrap a pipeline's ``__call__`` so that ``pipe.set_backend(...)`` applies to it (and only to it)."""
    import functools

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        choice = self.__dict__.get("_backend_choice")
        if choice is None:
            return call(self, *args, **kwargs)
        import fastdiff.backends as backends

        name, per_op = choice
        with backends.use_backend(name, **per_op):
            return call(self, *args, **kwargs)

    wrapper._fastdiff_backend_scope = True
    return wrapper


def _needs_noise_bank(scheduler, scheduler_kwargs) -> bool:
    """Whether ``scheduler.step`` may draw noise with these step arguments (then its draws are pre-drawn)."""
    draws = getattr(scheduler, "_noise_draws", None)
    if draws is None or draws() is None or not any(draws()):
        return False
    if "eta" in scheduler_kwargs and not scheduler_kwargs["eta"]:
        return False  # DDIM with eta = 0 draws nothing
    return True


class GraphPipelineMixin:
    """CUDA graphs, backend forcing, ``explain()`` and ``compile_unet()`` for the pipelines with a denoising loop.

    * ``__call__`` runs its loop through a :class:`fastdiff.graphs.GraphRunner` region: on CUDA each
      step (UNet + CFG combine + fused scheduler step) is captured once per shape and replayed; on
      the CPU, or when a step cannot be captured, it runs eagerly and :meth:`explain` says why.
    * ``_graph_backend``: the capture backend; ``None`` is CUDA graphs. Tests set a
      :class:`fastdiff.graphs.StandInBackend` instance (CPU capture/replay with the same static-buffer
      semantics).
    """

    _graph_backend = None
    _graph_max_graphs = 4
    _graph_max_bytes: Optional[int] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "_fastdiff_backend_scope", False):
            cls.__call__ = _with_backend_scope(call)

    # ---- switches ---------------------------------------------------------------------------

    def enable_cuda_graph(self, enabled: bool = True) -> None:
        """Turn the captured denoising loop on (default on CUDA) or off (``False``: every step eager).

        ``__call__(cuda_graph=...)`` overrides it for one call. Turning it off keeps the cached graphs;
        :meth:`release_graphs` frees them."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enable_cuda_graph: expected True or False, got {enabled!r}")
        object.__setattr__(self, "_cuda_graph_enabled", enabled)
        runner = self.__dict__.get("_graphs")
        if runner is not None:
            runner.enabled = enabled

    @property
    def cuda_graph_enabled(self) -> bool:
        return self.__dict__.get("_cuda_graph_enabled", True)

    def release_graphs(self) -> None:
        """Free every captured graph, its static buffers and the private memory pool (``del pipe`` does too)."""
        runner = self.__dict__.get("_graphs")
        if runner is not None:
            runner.release()

    @property
    def graph_runner(self):
        """The pipeline's :class:`fastdiff.graphs.GraphRunner` (made at the first call), or None."""
        return self.__dict__.get("_graphs")

    def _graph_runner(self):
        from fastdiff.graphs import GraphRunner

        runner = self.__dict__.get("_graphs")
        if runner is None:
            runner = GraphRunner(
                owner=self, backend=self._graph_backend, max_graphs=self._graph_max_graphs,
                max_bytes=self._graph_max_bytes, enabled=self.cuda_graph_enabled,
            )  # fmt: skip
            object.__setattr__(self, "_graphs", runner)
        return runner

    def set_backend(self, name: Optional[str] = None, **per_op: str) -> None:
        """Force backends for this pipeline's calls only: the same arguments as ``fastdiff.use_backend``
        (``set_backend("reference")``, ``set_backend(attention="sdpa")``), applied around ``__call__``.
        ``set_backend(None)`` with no keywords goes back to ``auto`` (and ``FASTDIFF_BACKEND``)."""
        import fastdiff.backends as backends

        if name is None and not per_op:
            object.__setattr__(self, "_backend_choice", None)
            return
        import fastdiff.ops  # noqa: F401 - registers the dispatchers

        with backends.use_backend(name, **per_op):  # checks the argument form
            pass
        known = set(backends._DISPATCHERS)
        unknown = sorted(set(per_op) - known)
        if unknown:
            raise ValueError(f"set_backend: unknown ops {unknown}; expected some of {sorted(known)}")
        for op, choice in per_op.items():
            allowed = [backends.AUTO, *backends._DISPATCHERS[op].backends]
            if choice not in allowed:
                raise ValueError(f"set_backend: {op}={choice!r} is not one of {allowed}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"set_backend: expected a backend name (str), got {name!r}")
        object.__setattr__(self, "_backend_choice", (name, dict(per_op)))

    def _backend_scope(self):
        import contextlib

        import fastdiff.backends as backends

        choice = self.__dict__.get("_backend_choice")
        if choice is None:
            return contextlib.nullcontext()
        return backends.use_backend(choice[0], **choice[1])

    def compile_unet(self, mode: str = "max-autotune-no-cudagraphs", fullgraph: bool = False, dynamic: bool = False, **kwargs):
        """Compile the UNet with ``torch.compile`` in place (``unet.compile(...)``), fastdiff's ops inside.

        fastdiff's kernels (attention, GroupNorm+SiLU, GEGLU) are custom ops with fake implementations,
        so the trace keeps them as they are and inductor fuses the rest (convolution and linear
        epilogues, residual adds). The default ``mode`` leaves CUDA graphs to the pipeline's own runner,
        which then captures the compiled UNet (after one eager step per new shape, which compiles);
        ``"reduce-overhead"`` and ``"max-autotune"`` would nest inductor's CUDA graphs inside ours and are
        refused. Returns the pipeline."""
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"compile_unet: mode={mode!r} makes inductor capture its own CUDA graphs, which the pipeline's graph "
                "runner already does; use 'max-autotune-no-cudagraphs' or 'default'"
            )
        self.unet.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, **kwargs)
        self.release_graphs()
        return self

    # ---- the loop ---------------------------------------------------------------------------

    def _graph_step(self, **tensors):
        """One denoising step for the graph runner: ``denoise_step`` with the region's tensors and this
        call's Python arguments (which are in the region's key)."""
        return self.denoise_step(**tensors, **self.__dict__.get("_graph_step_kwargs", {}))

    def _denoise_region(
        self,
        inputs: Dict[str, Any],
        *,
        step_kwargs: Dict[str, Any],
        scheduler_kwargs: Dict[str, Any],
        extra: Any,
        cuda_graph: Optional[bool],
        generator=None,
        callback_on_step_end=None,
        callback_tensor_inputs=(),
        reasons=(),
    ):
        """The region that runs this call's denoising steps (captured or eager), made once per call.

        ``inputs`` are the first step's tensors (their shapes fix the graph), ``step_kwargs`` the
        Python arguments of ``denoise_step`` (baked into a graph: their hashable form goes in the key
        with ``extra``). A stochastic scheduler's noise is pre-drawn from ``generator`` in diffusers'
        order before a captured loop, so the captured loop gives the eager images for a seed."""
        from fastdiff.graphs import scheduler_state_tensors

        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected None, True or False, got {cuda_graph!r}")
        object.__setattr__(self, "_graph_step_kwargs", step_kwargs)
        scheduler = self.scheduler
        region = self._graph_runner().region(
            "denoise_step", self._graph_step, inputs, modules=[self.unet], scheduler=scheduler,
            scheduler_kwargs=scheduler_kwargs, watch=lambda: scheduler_state_tensors(scheduler),
            extra=(type(self).__name__, extra), enabled=self.cuda_graph_enabled if cuda_graph is None else cuda_graph,
            callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_tensor_inputs, reasons=reasons,
        )  # fmt: skip
        if not region.reasons and _needs_noise_bank(scheduler, scheduler_kwargs):
            sample = inputs.get("latents", inputs.get("image"))
            scheduler.prepare_noise_bank(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        object.__setattr__(self, "_last_loop_reasons", list(region.reasons))
        return region

    # ---- explain ----------------------------------------------------------------------------

    def _explain_inputs(self, height, width, batch_size, guidance_scale, device, dtype, call_kwargs):
        """``(tensors, python_kwargs)`` of ``denoise_step``'s first step at these shapes (made under
        FakeTensorMode: shapes only), per pipeline."""
        raise NotImplementedError

    def explain(
        self,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: int = 1,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        target: Any = None,
        **call_kwargs,
    ) -> str:
        """Which backend each op of one denoising step uses at this pipeline's real shapes, every other
        backend's reasons, and whether the loop will be captured as CUDA graphs (and if not, why).

        Nothing runs on the device: the step runs once under ``FakeTensorMode`` (shapes only), on a
        copy of the scheduler. ``target`` (``"sm_90"``, ...): answer for that GPU
        (``fastdiff.backends.use_target``). ``call_kwargs``: the ``__call__`` arguments that change
        capture (``cuda_graph``, ``callback_on_step_end``, ``callback_on_step_end_tensor_inputs``, ``eta``,
        ``guidance_rescale``)."""
        import contextlib

        import fastdiff.backends as backends

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        scope = backends.use_target(target) if target is not None else contextlib.nullcontext()
        with self._backend_scope(), scope:
            return self._explain(height, width, batch_size, guidance_scale, num_inference_steps, target, call_kwargs)

    def _explain(self, height, width, batch_size, guidance_scale, num_inference_steps, target, call_kwargs):
        import copy

        from fastdiff.graphs import capture_reasons

        allowed = {"cuda_graph", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "eta", "guidance_rescale"}
        unknown = sorted(set(call_kwargs) - allowed)
        if unknown:
            raise TypeError(f"explain: unexpected arguments {unknown}; expected some of {sorted(allowed)}")
        device, dtype = self._execution_device, self.unet.dtype
        height, width = self._default_size(height, width)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        lines = [
            f"{type(self).__name__}.explain: batch_size={batch_size}, {height}x{width}, {num_inference_steps} steps, "
            f"{dtype} on {device}" + (f", target {target}" if target is not None else ""),
        ]
        # ---- the ops of one step, at these shapes
        calls, error = self._fake_step_calls(scheduler, height, width, batch_size, guidance_scale, device, dtype, call_kwargs)
        lines.append("ops of one denoising step (shapes only; nothing ran):")
        for (op, summary), text in calls.items():
            lines.append(f"- {op} {summary}:")
            lines += ["    " + line for line in text.splitlines()]
        if error is not None:
            lines.append(f"  (the shape-only run stopped early: {error})")
        # ---- the loop
        step_kwargs = {k: call_kwargs[k] for k in ("eta",) if k in call_kwargs}
        enabled = call_kwargs.get("cuda_graph")
        enabled = self.cuda_graph_enabled if enabled is None else enabled
        runner = self.__dict__.get("_graphs")
        from fastdiff.graphs import CUDAGraphBackend

        backend = runner.backend if runner is not None else (self._graph_backend or CUDAGraphBackend())
        reasons = list(self._loop_reasons(call_kwargs))
        reasons += capture_reasons(
            device, enabled=enabled, backend=backend,
            callback_on_step_end=call_kwargs.get("callback_on_step_end"),
            callback_tensor_inputs=call_kwargs.get("callback_on_step_end_tensor_inputs", ["latents"])
            if call_kwargs.get("callback_on_step_end") is not None else (),
            scheduler=scheduler, scheduler_kwargs=self._explain_scheduler_kwargs(scheduler, step_kwargs),
            modules=[self.unet],
        )  # fmt: skip
        if reasons:
            lines.append("denoising loop: runs eagerly, because:")
            lines += [f"  - {r}" for r in reasons]
        else:
            lines.append(
                "denoising loop: captured as CUDA graphs (the first step at a new shape runs eagerly to compile and "
                "tune, the second captures, the rest replay)"
            )
        if runner is not None:
            lines.append(runner.describe())
        return "\n".join(lines)

    def _explain_scheduler_kwargs(self, scheduler, step_kwargs):
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = step_kwargs.get("eta", 0.0)
        return kwargs

    def _loop_reasons(self, call_kwargs) -> List[str]:
        """This pipeline's own reasons to run its loop eagerly (a spatial resampler, ...)."""
        reasons = []
        if self.__dict__.get("_spatial_resampler") is not None:
            reasons.append(
                "a spatial resampler is attached: the latent size and the scheduler's buffers change mid-loop "
                "(set_spatial_resampler(None) to capture)"
            )
        return reasons

    def _default_size(self, height, width):
        size = self.unet.config.sample_size
        factor = getattr(self, "vae_scale_factor", 1)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return height or h * factor, width or w * factor

    def _fake_step_calls(self, scheduler, height, width, batch_size, guidance_scale, device, dtype, call_kwargs):
        """Run ``denoise_step`` once under FakeTensorMode on a scheduler copy; record every op's dispatch."""
        import collections

        from torch._subclasses.fake_tensor import FakeTensorMode

        import fastdiff.backends as backends
        import fastdiff.ops  # noqa: F401

        calls: "collections.OrderedDict" = collections.OrderedDict()
        originals = {}

        def spy(dispatcher):
            select = dispatcher.select

            def recording_select(inputs, backend=None, cache_key=None):
                summary = _summarize(dispatcher.op_name, inputs)
                key = (dispatcher.op_name, summary)
                if key not in calls:
                    calls[key] = dispatcher.explain(inputs, backend)
                return select(inputs, backend, cache_key=cache_key)

            return recording_select

        error = None
        real_scheduler = self.scheduler
        try:
            for dispatcher in backends._DISPATCHERS.values():
                originals[dispatcher] = dispatcher.__dict__.get("select")
                dispatcher.select = spy(dispatcher)
                # No cached plan may answer for select: every op of the step must be seen.
                dispatcher.lookup = _no_plan
            object.__setattr__(self, "scheduler", scheduler)
            if "_step_index" in scheduler.__dict__:
                scheduler._step_index = 0  # the first step's index, so no timestep lookup reads a fake value
            scheduler.step = _explaining_step(scheduler, calls, call_kwargs)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # kernels' data_ptr alignment checks on fake tensors
                inputs, step_kwargs = self._explain_inputs(height, width, batch_size, guidance_scale, device, dtype, call_kwargs)
                inputs = {k: _fakeify(mode, v) for k, v in inputs.items()}
                self.denoise_step(**inputs, **step_kwargs)
        except Exception as e:  # noqa: BLE001 - report what stopped the shape-only run
            error = f"{type(e).__name__}: {e}"
        finally:
            object.__setattr__(self, "scheduler", real_scheduler)
            for dispatcher, original in originals.items():
                dispatcher.__dict__.pop("lookup", None)
                if original is None:
                    del dispatcher.select
                else:
                    dispatcher.select = original
        return calls, error


def _no_plan(cache_key, backend=None):
    return None


def _explaining_step(scheduler, calls, call_kwargs):
    """A stand-in for ``scheduler.step`` under FakeTensorMode: records which path the step takes
    (the fused ``scheduler_step`` op and its backends, or the plain step and why) and returns ``sample``."""
    import types

    from fastdiff.ops.scheduler_step import explain as explain_step
    from fastdiff.schedulers.scheduling_utils import use_fused_step

    name = type(scheduler).__name__

    def step(model_output, timestep, sample, *args, guidance_scale=None, return_dict=True, **kwargs):
        fused_reasons = getattr(scheduler, "_fused_reasons", None)
        try:
            if fused_reasons is None:
                raise ValueError(f"{name} is not a fastdiff scheduler with a fused step")
            accepted = inspect.signature(fused_reasons).parameters
            reasons = fused_reasons(**{k: v for k, v in kwargs.items() if k in accepted})
            fused = use_fused_step(scheduler, sample, model_output, reasons)
            if not fused:
                raise ValueError("; ".join(reasons) or f"auto runs the fused step on CUDA only (this is {sample.device})")
            state = scheduler._fused_state(scheduler._fused.key if scheduler._fused.key is not None else ())
            coeffs = torch.empty(tuple(state.table.shape), dtype=torch.float32, device=sample.device)
            step_index = torch.zeros((1,), dtype=torch.int64, device=sample.device)
            history = None
            if state.slots:
                history = sample.new_empty((state.slots, *sample.shape))
            noise = torch.empty_like(sample) if any(state.draws) else None
            text = explain_step(
                sample, model_output, coeffs, step_index, guidance_scale=guidance_scale, noise=noise, history=history,
                advance_step_index=True,
            )  # fmt: skip
            calls[("scheduler step", f"{name}, fused (sample {tuple(sample.shape)}, {sample.dtype})")] = text
        except ValueError as error:
            calls[("scheduler step", f"{name}, plain PyTorch step")] = f"no fused step: {error}"
        out = sample
        return (out,) if not return_dict else types.SimpleNamespace(prev_sample=out)

    return step


def _fakeify(mode, value):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, dict):
        return {k: _fakeify(mode, v) for k, v in value.items()}
    return value


def _summarize(op_name: str, inputs) -> str:
    """A short shape description of one op call, for explain()."""
    def shape(name):
        t = inputs.get(name)
        return None if not isinstance(t, torch.Tensor) else tuple(t.shape)

    if op_name == "attention":
        q, k = shape("q"), shape("k")
        if q is not None and k is not None:
            return f"head dim {q[-1]}, query length {q[-2]}, key length {k[-2]} (q {q}, {inputs['q'].dtype})"
    x = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    parts = [f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor)][:3]
    extra = [f"{k}={v}" for k, v in inputs.items() if isinstance(v, (str, bool)) and k in ("activation",)]
    dtype = f", {x.dtype}" if x is not None else ""
    return "(" + ", ".join(parts + extra) + dtype + ")"
