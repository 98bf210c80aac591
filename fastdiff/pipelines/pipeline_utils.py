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
