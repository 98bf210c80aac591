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

import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

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


def call_maybe_checkpointed(module: nn.Module, checkpointed: bool, *args):
    """``module(*args)``, recomputed in the backward pass when ``checkpointed`` and grad is on.

    Blocks call this with their ``gradient_checkpointing`` flag, which
    :meth:`ModelMixin.enable_gradient_checkpointing` sets.
    """
    if checkpointed and torch.is_grad_enabled():
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


def resolve_model_folder(name_or_path: Union[str, os.PathLike], subfolder: Optional[str]) -> str:
    """A local folder as is; otherwise a Hugging Face Hub id fetched through huggingface_hub's cache."""
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
        return huggingface_hub.snapshot_download(name, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{name} is neither a local folder nor a model on the Hugging Face Hub") from None
    except Exception as e:  # connection errors, offline mode, cache misses: one line, no traceback chain
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
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    # ----------------------------------------------------------- properties

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

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

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in the backward pass instead of storing them."""
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_gradient_checkpointing(self, value: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    # ---------------------------------------------------------------- saving

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        variant: Optional[str] = None,
        max_shard_size: Union[int, str] = "10GB",
        safe_serialization: bool = True,
    ) -> None:
        """Write ``config.json`` and the weights in diffusers' layout, sharded above ``max_shard_size``."""
        save_directory = os.fspath(save_directory)
        max_bytes = parse_size(max_shard_size)
        self.save_config(save_directory)

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
                torch.save(shard, path)

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
    ):
        """Load a model folder saved by diffusers or by fastdiff.

        Args:
            pretrained_model_name_or_path: a local folder, or a Hub id (fetched through
                huggingface_hub's cache when that package is installed).
            subfolder: the model's folder inside it, e.g. ``"unet"``.
            torch_dtype: floating dtype for the parameters; default float32.
            variant: weights variant such as ``"fp16"``; it must exist.
            use_safetensors: ``True`` only safetensors, ``False`` only ``.bin``,
                ``None`` safetensors first.
        """
        if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point):
            raise ValueError(f"torch_dtype: expected a floating torch.dtype, got {torch_dtype!r}")
        folder = resolve_model_folder(pretrained_model_name_or_path, subfolder)
        directory = os.path.join(folder, subfolder) if subfolder else folder
        config = cls.load_config(folder, subfolder=subfolder)
        files = resolve_weight_files(directory, variant, use_safetensors)

        with torch.device("meta"):
            model = cls.from_config(config)
        state_dict, source = {}, {}
        for path in files:
            for key, tensor in load_weights_file(path).items():
                state_dict[key] = tensor
                source[key] = path
        model._rename_legacy_keys(state_dict, source)
        model._check_and_assign(state_dict, source, torch_dtype)
        model.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        model.eval()
        return model

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
        self, state_dict: Dict[str, torch.Tensor], source: Dict[str, str], torch_dtype: Optional[torch.dtype]
    ) -> None:
        expected = self.state_dict()
        files = sorted(set(source.values()))
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
        for key, target in expected.items():
            tensor = state_dict[key]
            if tensor.shape != target.shape:
                raise ValueError(
                    f"{type(self).__name__}: key {key!r} in {source[key]} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            if tensor.is_floating_point():
                tensor = tensor.to(torch_dtype or target.dtype)
            assigned[key] = tensor
        self.load_state_dict(assigned, strict=True, assign=True)


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
