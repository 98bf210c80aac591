"""``ModelMixin``: loading and saving diffusers-format model folders.

A model folder holds ``config.json`` and its weights:

* ``diffusion_pytorch_model.safetensors``, or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json``;
* a variant inserts its name before the extension:
  ``diffusion_pytorch_model.fp16.safetensors``,
  ``diffusion_pytorch_model.safetensors.index.fp16.json``;
* ``diffusion_pytorch_model.bin`` (or ``.bin.index.json`` shards) is read only
  through ``torch.load(weights_only=True)``, so loading never runs pickled code.

Loading is strict: missing or unexpected keys, shape mismatches, a missing
config, a truncated file or a missing variant each raise an error that names the
file or the keys. The model is built on the meta device and the checkpoint
tensors are assigned to it, so no time is spent on random initialisation.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from fastdiff.nn.attention_processor import AttentionProcessorMixin
from fastdiff.utils.outputs import BaseOutput  # noqa: F401  (re-exported: the models import it from here)

logger = logging.getLogger(__name__)

WEIGHTS_STEM = "diffusion_pytorch_model"
SAFETENSORS_NAME = f"{WEIGHTS_STEM}.safetensors"
SAFETENSORS_INDEX_NAME = f"{WEIGHTS_STEM}.safetensors.index.json"
BIN_NAME = f"{WEIGHTS_STEM}.bin"
BIN_INDEX_NAME = f"{WEIGHTS_STEM}.bin.index.json"

# Old names of the attention blocks in VAEs and UNet2DModel (diffusers < 0.14) -> current names.
_LEGACY_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

_MAX_KEYS_SHOWN = 20


def call_maybe_checkpointed(module: nn.Module, block: Union[nn.Module, bool], *args):
    """``module(*args)``, recomputed in the backward pass when ``block`` is checkpointed and grad is on.

    ``block`` is the calling block, whose ``gradient_checkpointing`` flag and
    ``_gradient_checkpointing_func`` :meth:`ModelMixin.enable_gradient_checkpointing` sets
    (a plain bool works too). The default is ``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)``, as in diffusers.
    """
    if isinstance(block, bool):
        checkpointed, func = block, None
    else:
        checkpointed = getattr(block, "gradient_checkpointing", False)
        func = getattr(block, "_gradient_checkpointing_func", None)
    if checkpointed and torch.is_grad_enabled():
        if func is not None:
            return func(module, *args)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def add_variant(name: str, variant: Optional[str]) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def parse_size(size: Union[int, str]) -> int:
    """``"10GB"`` -> 10**9 bytes; ints pass through."""
    if isinstance(size, int) and size > 0:
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", size, flags=re.IGNORECASE)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    raise ValueError(f"max_shard_size: expected a positive int or a string such as '5GB' or '500MB', got {size!r}")


def _list_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return f"[{shown}{more}]"


# ---------------------------------------------------------------------------
# Reading weight files
# ---------------------------------------------------------------------------


def load_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """Read one safetensors or ``.bin`` file into a CPU state dict.

    ``.bin`` files go through ``torch.load(weights_only=True)``. A truncated or
    corrupt file raises an OSError that names it.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise OSError(f"cannot read weights file {path}: it is truncated or corrupt ({e})") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise OSError(f"refusing to load {path}: it holds more than plain tensors ({e})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise OSError(f"cannot read weights file {path}: it is truncated or corrupt ({e})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise OSError(f"weights file {path} does not hold a dict of tensors")
    return state_dict


def _weights_candidates(use_safetensors: Optional[bool]) -> List[Tuple[str, bool]]:
    """(file name, is_index) pairs in the order they are looked for."""
    safetensors_files = [(SAFETENSORS_INDEX_NAME, True), (SAFETENSORS_NAME, False)]
    bin_files = [(BIN_INDEX_NAME, True), (BIN_NAME, False)]
    if use_safetensors is True:
        return safetensors_files
    if use_safetensors is False:
        return bin_files
    return safetensors_files + bin_files


def resolve_weight_files(directory: str, variant: Optional[str], use_safetensors: Optional[bool]) -> List[str]:
    """The weight files of a model folder: one file, or every shard named by an index."""
    candidates = _weights_candidates(use_safetensors)
    for name, is_index in candidates:
        path = os.path.join(directory, add_variant(name, variant))
        if not os.path.isfile(path):
            continue
        if not is_index:
            return [path]
        return _shards_from_index(directory, path)

    expected = [add_variant(name, variant) for name, _ in candidates]
    present = sorted(f for f in os.listdir(directory) if f.startswith(WEIGHTS_STEM)) if os.path.isdir(directory) else []
    if variant is not None:
        raise FileNotFoundError(
            f"variant {variant!r} not found in {directory}: expected one of {expected}; weight files present: {present}"
        )
    raise FileNotFoundError(f"no weights in {directory}: expected one of {expected}; weight files present: {present}")


def _shards_from_index(directory: str, index_path: str) -> List[str]:
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OSError(f"index file {index_path} is corrupt: expected JSON with a 'weight_map' entry ({e})") from None
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not os.path.isfile(os.path.join(directory, shard)):
            raise FileNotFoundError(f"shard {shard} listed in {index_path} is missing from {directory}")
    return [os.path.join(directory, shard) for shard in shards]


# ---------------------------------------------------------------------------
# Hub ids
# ---------------------------------------------------------------------------


def resolve_model_folder(
    name_or_path: Union[str, os.PathLike], subfolder: Optional[str], **hub_kwargs: Any
) -> str:
    """A local folder as is; otherwise a Hugging Face Hub id fetched through huggingface_hub's cache.

    ``hub_kwargs`` (``revision``, ``cache_dir``, ``local_files_only``, ``force_download``,
    ``proxies``, ``token``) are huggingface_hub's download options: passed on for a Hub id,
    ignored for a local folder (as diffusers does).
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ValueError(f"pretrained_model_name_or_path: {name} is a file, expected a model folder or a Hub id")
    if name.count("/") > 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"pretrained_model_name_or_path: no folder {name}")
    try:
        import huggingface_hub
        from huggingface_hub.utils import RepositoryNotFoundError
    except ImportError:
        raise FileNotFoundError(
            f"{name} is not a local folder, and huggingface_hub is not installed to fetch it from the Hub"
        ) from None
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [f"{prefix}config.json", f"{prefix}{WEIGHTS_STEM}*"]
    try:
        options = {k: v for k, v in hub_kwargs.items() if v is not None}
        return huggingface_hub.snapshot_download(name, allow_patterns=patterns, **options)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name} is neither a local folder nor a model on the Hugging Face Hub") from None
    except Exception as e:  # connection errors, offline mode, cache misses: one line, no traceback chain
        if hub_kwargs.get("local_files_only"):
            raise OSError(
                f"{name} is not a local folder and is not in the local Hugging Face cache "
                f"(local_files_only=True; {type(e).__name__})"
            ) from None
        raise OSError(
            f"{name} is not a local folder and the Hugging Face Hub cannot be reached to fetch it "
            f"({type(e).__name__}); pass a local folder or connect to the Hub"
        ) from None


# ---------------------------------------------------------------------------
# ModelMixin
# ---------------------------------------------------------------------------


class ModelMixin(AttentionProcessorMixin, nn.Module):
    """Base class of fastdiff models: diffusers-format ``from_pretrained`` / ``save_pretrained``.

    Subclasses also inherit :class:`~fastdiff.models.configuration_utils.ConfigMixin`
    and decorate ``__init__`` with ``@register_to_config``, as in diffusers.

    ``_keep_in_fp32_modules`` (a class attribute, as in diffusers) names submodules whose
    parameters ``from_pretrained(torch_dtype=...)`` keeps in float32: a parameter is kept
    when one of the names is a component of its dotted key.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False
    _keep_in_fp32_modules: Optional[Union[str, List[str]]] = None
    #: Regexes of checkpoint keys a model drops by design; they are not reported as unexpected (diffusers).
    _keys_to_ignore_on_load_unexpected: Optional[List[str]] = None
    #: diffusers' device-map hint; fastdiff places a whole model on one device, so it is informational.
    _no_split_modules: Optional[List[str]] = None

    def __getattr__(self, name: str) -> Any:
        # Modules, parameters and buffers first (nn.Module), then config keys read as
        # attributes, which diffusers still allows with a FutureWarning.
        try:
            return super().__getattr__(name)
        except AttributeError:
            internal = self.__dict__.get("_internal_dict")
            if internal is None or name not in internal:
                raise
        cls_name = type(self).__name__
        warnings.warn(
            f"Accessing config attribute `{name}` directly via '{cls_name}' object attribute is deprecated. "
            f"Please access '{name}' over '{cls_name}'s config object instead, e.g. 'model.config.{name}'.",
            FutureWarning,
            stacklevel=2,
        )
        return internal[name]

    # ----------------------------------------------------------- properties

    @classmethod
    def _fp32_module_names(cls) -> List[str]:
        names = cls._keep_in_fp32_modules
        if names is None:
            return []
        return [names] if isinstance(names, str) else list(names)

    def _kept_in_fp32(self, key: str) -> bool:
        return any(name in key.split(".") for name in self._fp32_module_names())

    @property
    def dtype(self) -> torch.dtype:
        """The first floating dtype among the parameters (those kept in fp32 skipped), then buffers."""
        last = None
        for name, param in self.named_parameters():
            last = param.dtype
            if self._kept_in_fp32(name):
                continue
            if param.is_floating_point():
                return param.dtype
        for buffer in self.buffers():
            last = buffer.dtype
            if buffer.is_floating_point():
                return buffer.dtype
        if last is None:
            raise AttributeError(f"{type(self).__name__} has no parameters or buffers, so it has no dtype")
        return last

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (or buffer)."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        raise AttributeError(f"{type(self).__name__} has no parameters or buffers, so it has no device")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters; ``only_trainable`` counts those with ``requires_grad``,
        ``exclude_embeddings`` leaves out ``nn.Embedding`` weights."""
        skip = set()
        if exclude_embeddings:
            skip = {f"{name}.weight" for name, module in self.named_modules() if isinstance(module, nn.Embedding)}
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if name not in skip and (p.requires_grad or not only_trainable)
        )

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers)."""
        tensors = itertools.chain(self.parameters(), self.buffers() if return_buffers else ())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------ fused projections

    def fuse_qkv_projections(self) -> None:
        """Run each attention's q/k/v projections (k/v for cross-attention) as one GEMM.

        State_dict keys do not change; see ``fastdiff.nn.Attention.fuse_projections``.
        """
        from fastdiff.nn import Attention

        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        from fastdiff.nn import Attention

        for module in self.modules():
            if isinstance(module, Attention):
                module.unfuse_projections()

    # ------------------------------------------------------ gradient checkpointing

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Optional[Callable] = None) -> None:
        """Recompute block activations in the backward pass instead of storing them.

        ``gradient_checkpointing_func(module, *args)`` replaces the default
        ``torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)``, as in diffusers.
        """
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        if gradient_checkpointing_func is not None and not callable(gradient_checkpointing_func):
            raise ValueError(
                f"gradient_checkpointing_func: expected a callable (module, *args), got {gradient_checkpointing_func!r}"
            )
        self._set_gradient_checkpointing(True, gradient_checkpointing_func)

    def disable_gradient_checkpointing(self) -> None:
        if self._supports_gradient_checkpointing:
            self._set_gradient_checkpointing(False, None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_gradient_checkpointing(self, value: bool, func: Optional[Callable] = None) -> None:
        found = False
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value
                # A plain attribute (not a submodule): call_maybe_checkpointed reads it.
                object.__setattr__(module, "_gradient_checkpointing_func", func)
                found = True
        if not found:
            raise ValueError(f"{type(self).__name__} has no block with a `gradient_checkpointing` flag")

    # ---------------------------------------------------------------- saving

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        is_main_process: bool = True,
        save_function: Optional[Callable] = None,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Union[int, str] = "10GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write ``config.json`` and the weights in diffusers' layout, sharded above ``max_shard_size``.

        Keywords are diffusers': ``is_main_process=False`` writes the weights but not the
        config and removes no stale files (the main process does); ``save_function(shard, path)``
        replaces ``torch.save`` for ``.bin`` weights (``safe_serialization=False``).
        ``push_to_hub=True`` raises: fastdiff never uploads.
        """
        if push_to_hub:
            raise NotImplementedError(
                "push_to_hub: fastdiff does not upload to the Hugging Face Hub; save locally and upload with "
                "huggingface_hub.upload_folder"
            )
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)}")
        if save_function is not None and not callable(save_function):
            raise ValueError(f"save_function: expected a callable (state_dict, path), got {save_function!r}")
        save_directory = os.fspath(save_directory)
        max_bytes = parse_size(max_shard_size)
        if is_main_process:
            self.save_config(save_directory)
        else:
            if os.path.isfile(save_directory):
                raise ValueError(f"save_directory: {save_directory} is a file, expected a folder")
            os.makedirs(save_directory, exist_ok=True)

        weights_name = add_variant(SAFETENSORS_NAME if safe_serialization else BIN_NAME, variant)
        index_name = add_variant(SAFETENSORS_INDEX_NAME if safe_serialization else BIN_INDEX_NAME, variant)
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        shards = _split_into_shards(state_dict, max_bytes)

        stem, ext = weights_name.rsplit(".", 1)
        if len(shards) == 1:
            files = {weights_name: shards[0]}
        else:
            files = {f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}": shard for i, shard in enumerate(shards)}

        # Remove what a previous save with the same name left behind, so stale shards never mix in.
        if is_main_process:
            stale = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{ext}|{re.escape(index_name)}")
            for existing in os.listdir(save_directory):
                if stale.fullmatch(existing) and existing not in files:
                    os.remove(os.path.join(save_directory, existing))

        for filename, shard in files.items():
            path = os.path.join(save_directory, filename)
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(shard, path, metadata={"format": "pt"})
            else:
                (save_function or torch.save)(shard, path)

        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                "weight_map": {key: filename for filename, shard in files.items() for key in shard},
            }
            with open(os.path.join(save_directory, index_name), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        logger.info("model weights saved in %s as %d file(s)", save_directory, len(files))

    # --------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        subfolder: Optional[str] = None,
        torch_dtype: Optional[torch.dtype] = None,
        variant: Optional[str] = None,
        use_safetensors: Optional[bool] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        low_cpu_mem_usage: Optional[bool] = None,
        device_map: Union[None, str, int, torch.device, Dict[str, Union[str, int, torch.device]]] = None,
        output_loading_info: bool = False,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        local_files_only: Optional[bool] = None,
        force_download: bool = False,
        proxies: Optional[Dict[str, str]] = None,
        token: Optional[Union[str, bool]] = None,
        ignore_mismatched_sizes: bool = False,
        **config_overrides,
    ):
        """Load a model folder saved by diffusers or by fastdiff.

        Args:
            pretrained_model_name_or_path: a local folder, or a Hub id (fetched through
                huggingface_hub's cache when that package is installed).
            subfolder: the model's folder inside it, e.g. ``"unet"``.
            torch_dtype / dtype: floating dtype for the parameters (``dtype`` is diffusers'
                newer name and wins when both are given); default float32. Modules named in
                ``_keep_in_fp32_modules`` stay float32.
            variant: weights variant such as ``"fp16"``; it must exist.
            use_safetensors: ``True`` only safetensors, ``False`` only ``.bin``,
                ``None`` safetensors first.
            low_cpu_mem_usage: ``True``/``None`` (default) builds the model on the meta device
                and assigns the checkpoint's tensors, so nothing is initialised twice (no
                accelerate needed); ``False`` initialises the model on the CPU first and
                copies the weights in.
            device_map: where the weights go as they are assigned: ``None`` (the CPU), a
                device (``"cpu"``, ``"cuda:1"``, ``torch.device``, a CUDA index), ``{"": device}``,
                or ``"auto"`` (the current CUDA device when there is one, else the CPU). A
                per-module map that splits the model raises NotImplementedError.
            output_loading_info: also return ``{"missing_keys", "unexpected_keys",
                "mismatched_keys", "error_msgs"}``. Loading is strict, so they are empty
                lists (any mismatch raises), unless ``ignore_mismatched_sizes`` lists keys.
            revision, cache_dir, local_files_only, force_download, proxies, token:
                huggingface_hub's download options, used for a Hub id and ignored for a local folder.
            ignore_mismatched_sizes: keep the freshly initialised tensor for a key whose shape
                differs from the checkpoint's (listed in ``mismatched_keys``) instead of raising.
            config_overrides: config entries that replace the saved ones (as in diffusers,
                e.g. ``sample_size=64``); an unknown name raises a ValueError.
        """
        if dtype is not None:
            torch_dtype = dtype
        if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point):
            raise ValueError(f"torch_dtype: expected a floating torch.dtype, got {torch_dtype!r}")
        device = _resolve_device_map(device_map)
        fp32_modules = cls._fp32_module_names()
        if low_cpu_mem_usage is False and device_map is not None:
            raise ValueError(
                f"low_cpu_mem_usage: cannot be False with device_map={device_map!r}; as in diffusers, placing "
                "weights while loading needs low_cpu_mem_usage=True"
            )
        if low_cpu_mem_usage is False and fp32_modules:
            raise ValueError(
                f"low_cpu_mem_usage: cannot be False for {cls.__name__}, whose _keep_in_fp32_modules "
                f"{fp32_modules} need the meta-device load (as in diffusers)"
            )
        if ignore_mismatched_sizes and low_cpu_mem_usage is not False:
            # Mismatched keys keep their initialised values, so the model must be initialised.
            low_cpu_mem_usage = False
        folder = resolve_model_folder(
            pretrained_model_name_or_path, subfolder, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download or None, proxies=proxies, token=token,
        )
        directory = os.path.join(folder, subfolder) if subfolder else folder
        config = cls.load_config(folder, subfolder=subfolder)
        files = resolve_weight_files(directory, variant, use_safetensors)

        if low_cpu_mem_usage is False:
            model = cls.from_config(config, **config_overrides)
        else:
            with torch.device("meta"):
                model = cls.from_config(config, **config_overrides)
        state_dict, source = {}, {}
        for path in files:
            for key, tensor in load_weights_file(path).items():
                state_dict[key] = tensor
                source[key] = path
        model._rename_legacy_keys(state_dict, source)
        mismatched = model._check_and_assign(
            state_dict, source, torch_dtype, device=device, assign=low_cpu_mem_usage is not False,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
        )
        if torch_dtype is not None and low_cpu_mem_usage is False:
            # Initialised tensors kept for mismatched keys follow the requested dtype too.
            model._cast_floating(torch_dtype)
        model.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        model.eval()
        if output_loading_info:
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": mismatched, "error_msgs": []}
            return model, info
        return model

    def _cast_floating(self, dtype: torch.dtype) -> None:
        for name, tensor in itertools.chain(self.named_parameters(), self.named_buffers()):
            if tensor.is_floating_point() and not self._kept_in_fp32(name):
                tensor.data = tensor.data.to(dtype)

    def _rename_legacy_keys(self, state_dict: Dict[str, torch.Tensor], source: Dict[str, str]) -> None:
        """Rename old attention-block keys (query/key/value/proj_attn) in place, as diffusers does."""
        for path, module in self.named_modules():
            if not getattr(module, "_from_deprecated_attn_block", False):
                continue
            for old, new in _LEGACY_ATTENTION_RENAMES.items():
                for suffix in ("weight", "bias"):
                    old_key, new_key = f"{path}.{old}.{suffix}", f"{path}.{new}.{suffix}"
                    if old_key in state_dict and new_key not in state_dict:
                        state_dict[new_key] = state_dict.pop(old_key)
                        source[new_key] = source.pop(old_key)

    def _check_and_assign(
        self,
        state_dict: Dict[str, torch.Tensor],
        source: Dict[str, str],
        torch_dtype: Optional[torch.dtype],
        device: Optional[torch.device] = None,
        assign: bool = True,
        ignore_mismatched_sizes: bool = False,
    ) -> List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]:
        """Check the keys and shapes, then assign (meta model) or copy the tensors in.

        Returns the ``(key, checkpoint shape, model shape)`` of keys skipped under
        ``ignore_mismatched_sizes``.
        """
        expected = self.state_dict()
        files = sorted(set(source.values()))
        for pattern in self._keys_to_ignore_on_load_unexpected or ():
            for key in [k for k in state_dict if k not in expected and re.search(pattern, k)]:
                del state_dict[key]
        missing = set(expected) - set(state_dict)
        unexpected = set(state_dict) - set(expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {_list_keys(missing)}")
            if unexpected:
                parts.append(f"unexpected keys {_list_keys(unexpected)}")
            raise ValueError(f"{type(self).__name__}: weights in {files} do not match the model: " + "; ".join(parts))
        assigned = OrderedDict()
        mismatched = []
        for key, target in expected.items():
            tensor = state_dict[key]
            if tensor.shape != target.shape:
                if ignore_mismatched_sizes:
                    mismatched.append((key, tuple(tensor.shape), tuple(target.shape)))
                    continue
                raise ValueError(
                    f"{type(self).__name__}: key {key!r} in {source[key]} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            if tensor.is_floating_point():
                if torch_dtype is not None and self._kept_in_fp32(key):
                    tensor = tensor.to(torch.float32)
                else:
                    tensor = tensor.to(torch_dtype or target.dtype)
            if device is not None:
                tensor = tensor.to(device)
            assigned[key] = tensor
        if assign:
            self.load_state_dict(assigned, strict=True, assign=True)
            left_on_meta = [name for name, t in itertools.chain(self.named_parameters(), self.named_buffers()) if t.is_meta]
            if left_on_meta:
                raise RuntimeError(
                    f"{type(self).__name__}: tensors {_list_keys(left_on_meta)} are not in the state_dict and stayed "
                    "on the meta device; load with low_cpu_mem_usage=False"
                )
        else:
            if device is not None:
                self.to(device)
            self.load_state_dict(assigned, strict=not mismatched)
        return mismatched


def _resolve_device_map(device_map) -> Optional[torch.device]:
    """diffusers' ``device_map`` values that place a whole model on one device -> that device."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise NotImplementedError(
                f"device_map: fastdiff places a whole model on one device; a per-module map {device_map!r} is not "
                "supported (pass {'': device}, a device or 'auto')"
            )
        device_map = device_map[""]
    if isinstance(device_map, bool):
        raise ValueError(f"device_map: expected None, 'auto', a device or a CUDA index, got {device_map!r}")
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        if device_map != "auto" and torch.cuda.device_count() > 1:
            raise NotImplementedError(
                f"device_map={device_map!r}: fastdiff does not split a model across {torch.cuda.device_count()} GPUs; "
                "pass one device or 'auto'"
            )
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        if device_map < 0:
            raise ValueError("device_map: a negative int is not a device; pass device_map='cpu' for the CPU")
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        try:
            return torch.device(device_map)
        except RuntimeError:
            raise ValueError(
                f"device_map: expected a device name (e.g. 'cpu', 'cuda:0'), 'auto', a CUDA index or {{'': device}}, "
                f"got {device_map!r}"
            ) from None
    raise ValueError(f"device_map: expected None, 'auto', a device, a CUDA index or {{'': device}}, got {device_map!r}")


def _split_into_shards(state_dict: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    """Greedy split in key order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
