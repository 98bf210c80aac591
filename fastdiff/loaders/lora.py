"""LoRA loading for fastdiff's Stable Diffusion pipelines, with diffusers' method names.

The mixins are bases of ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``
(``StableDiffusionLoraLoaderMixin``) and ``StableDiffusionXLPipeline``
(``StableDiffusionXLLoraLoaderMixin``). No peft: each LoRA-carrying ``nn.Linear``/``nn.Conv2d`` of
the pipeline's UNet and text encoders is replaced, on that instance, by a
:class:`fastdiff.loaders.lora_layers.LoRALayer` (``unload_lora_weights`` puts the originals back).

Under CUDA graphs (``fastdiff.graphs``): ``fuse_lora``, ``unfuse_lora`` and switching fused adapters
write the existing weight tensors in place (and refresh a fused QKV weight of
``fastdiff.nn.Attention.fuse_projections`` in place), so a captured graph stays valid; a new
``adapter_weights`` for the same active adapters is written in place into each layer's device scale
buffer; a change of which adapters run allocates new buffers, so the runner recaptures. An active
unfused adapter on q/k/v of an Attention whose projections are fused un-fuses them (re-fused when no
unfused adapter is active there any more): never a fused GEMM that skips the adapter.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import weakref
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from fastdiff.loaders.lora_conversion import check_entries, parse_metadata, split_lora_state_dict
from fastdiff.loaders.lora_layers import LoRALayer

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def read_lora_file(path, weight_name: Optional[str] = None):
    """(state_dict, raw safetensors metadata or None) from a LoRA file or a folder holding one."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path_or_dict: expected a local path or a state dict, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        if weight_name is not None:
            file = os.path.join(path, weight_name)
        else:
            candidates = [os.path.join(path, n) for n in (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME)]
            found = [c for c in candidates if os.path.isfile(c)]
            if not found:
                tensors = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
                found = [os.path.join(path, tensors[0])] if len(tensors) == 1 else []
            if not found:
                raise FileNotFoundError(
                    f"pretrained_model_name_or_path_or_dict: no {LORA_WEIGHT_NAME_SAFE} or {LORA_WEIGHT_NAME} in the folder "
                    f"{path!r} (pass weight_name=)"
                )
            file = found[0]
    elif weight_name is not None:
        file = os.path.join(path, weight_name)
    else:
        file = path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"pretrained_model_name_or_path_or_dict: no LoRA file at {file!r} (fastdiff loads local files and folders only)"
        )
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        return state_dict, metadata
    return torch.load(file, map_location="cpu", weights_only=True), None


def lora_layers_of(model: nn.Module):
    """(path, LoRALayer) for every LoRA layer in ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALayer)]


def get_lora_state_dict(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """The adapter's weights with peft's keys (``<module path>.lora_A.weight``/``.lora_B.weight``),
    what ``get_peft_model_state_dict`` gives for a diffusers model: pass it to ``save_lora_weights``."""
    out = {}
    for path, layer in lora_layers_of(model):
        if adapter_name in layer.lora_A:
            out[f"{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().clone()
            out[f"{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().clone()
    return out


def get_lora_adapter_metadata(model: nn.Module, adapter_name: str) -> Optional[dict]:
    """peft LoraConfig fields (r, lora_alpha, rank/alpha patterns, target_modules) of the adapter in
    ``model``, for ``save_lora_weights(..., unet_lora_adapter_metadata=...)``; None if absent."""
    ranks, alphas = {}, {}
    for path, layer in lora_layers_of(model):
        if adapter_name in layer.lora_A:
            rank = layer.lora_A[adapter_name].weight.shape[0]
            ranks[path] = rank
            alphas[path] = layer.alpha_scale[adapter_name] * rank
    if not ranks:
        return None
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_dora": False,
        "lora_bias": False,
    }


def _replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _short_list(items: Sequence[str], limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class _LoraState:
    """The pipeline's LoRA bookkeeping (kept in ``pipe.__dict__['_lora']``)."""

    def __init__(self):
        self.adapters: "collections.OrderedDict[str, Dict[str, List[str]]]" = collections.OrderedDict()
        self.active: List[str] = []
        self.weights: Dict[str, Dict[str, float]] = {}
        self.enabled = True
        self.hooks: list = []
        self.unfused_attention: list = []  # fastdiff Attention modules whose projections LoRA un-fused
        self.layers: Dict[str, list] = {}  # component -> [LoRALayer] (refreshed on load/delete)
        self.attention: list = []  # fastdiff Attention modules of the UNet with a LoRALayer among q/k/v
        self.loaded = 0
        self.text_scale: Optional[float] = None  # encode_prompt's lora_scale (see _lora_text_scale)


# ---------------------------------------------------------------------------------------------
# the mixins
# ---------------------------------------------------------------------------------------------


class StableDiffusionLoraLoaderMixin:
    """LoRA methods of the SD pipelines (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...)."""

    _lora_loadable_modules = ["unet", "text_encoder"]
    unet_name = "unet"
    text_encoder_name = "text_encoder"

    # ---- state ------------------------------------------------------------------------------

    @property
    def _lora(self) -> _LoraState:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = _LoraState()
            object.__setattr__(self, "_lora_state", state)
        return state

    def _lora_models(self) -> Dict[str, nn.Module]:
        return {n: getattr(self, n, None) for n in self._lora_loadable_modules if getattr(self, n, None) is not None}

    # ---- reading ----------------------------------------------------------------------------

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, weight_name: Optional[str] = None, **kwargs):
        """``(state_dict, network_alphas)`` (``return_lora_metadata=True``: and the metadata) as stored,
        from a local file/folder or a dict. ``network_alphas``: ``{module key: alpha}`` from ``.alpha``
        keys (kohya) or None. Keys are not renamed: kohya names are resolved against the model by
        :meth:`load_lora_weights`."""
        return_metadata = kwargs.pop("return_lora_metadata", False)
        if kwargs:
            raise TypeError(f"lora_state_dict: unexpected arguments {sorted(kwargs)} (fastdiff loads local files only)")
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            state_dict, raw = dict(pretrained_model_name_or_path_or_dict), None
        else:
            state_dict, raw = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name)
        alphas = {k[: -len(".alpha")]: float(v) for k, v in state_dict.items() if k.endswith(".alpha")}
        out = (state_dict, alphas or None)
        if return_metadata:
            out = out + (parse_metadata(raw) or None,)
        return out

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        weight_name: Optional[str] = None,
        **kwargs,
    ) -> None:
        """Load a LoRA (diffusers/peft or kohya/A1111 format) into the UNet and text encoder(s) as
        adapter ``adapter_name`` (default ``default_<n>``), and make it the active adapter (as diffusers does;
        ``set_adapters`` combines several).

        Every key must land in a module of this pipeline with fitting shapes; otherwise a ValueError
        lists the keys, and the pipeline is left unchanged."""
        kwargs.pop("low_cpu_mem_usage", None)
        if kwargs.pop("hotswap", False):
            raise NotImplementedError("load_lora_weights: hotswap=True is not supported by fastdiff")
        if kwargs:
            raise TypeError(f"load_lora_weights: unexpected arguments {sorted(kwargs)}")
        state = self._lora
        if adapter_name is None:
            adapter_name = f"default_{state.loaded}"
            while adapter_name in state.adapters:
                state.loaded += 1
                adapter_name = f"default_{state.loaded}"
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty string without dots, got {adapter_name!r}")
        if adapter_name in state.adapters:
            raise ValueError(f"adapter_name: an adapter {adapter_name!r} is already loaded; pick another name or delete it")
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            state_dict, raw = dict(pretrained_model_name_or_path_or_dict), None
        else:
            state_dict, raw = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name)
        metadata = parse_metadata(raw)
        if not state_dict:
            raise ValueError("load_lora_weights: the LoRA state dict is empty")
        models = self._lora_models()
        entries, unknown = split_lora_state_dict(state_dict, models, metadata)
        if unknown:
            raise ValueError(
                f"load_lora_weights: {len(unknown)} LoRA keys match no module of {type(self).__name__} "
                f"({', '.join(models)}): {_short_list(unknown)}. Nothing was loaded."
            )
        problems = check_entries(entries, models)
        if problems:
            raise ValueError(
                f"load_lora_weights: the LoRA does not fit {type(self).__name__} (another architecture?): "
                f"{_short_list(problems, 6)}. Nothing was loaded."
            )
        # -- everything checked: install
        placed: Dict[str, List[str]] = {}
        for component, by_path in entries.items():
            model = models[component]
            for path, entry in by_path.items():
                module = model.get_submodule(path)
                if not isinstance(module, LoRALayer):
                    module = LoRALayer(module)
                    _replace_submodule(model, path, module)
                module.add_adapter(adapter_name, entry.down, entry.up, entry.alpha)
            placed[component] = list(by_path)
        state.adapters[adapter_name] = placed
        state.weights[adapter_name] = {c: 1.0 for c in self._lora_loadable_modules}
        state.loaded += 1
        state.active = [adapter_name]  # diffusers: the adapter just loaded is the active one
        self._lora_refresh_layers()
        self._lora_install_hooks()
        self._lora_apply()

    # ---- adapters ---------------------------------------------------------------------------

    def _lora_check_names(self, names, what: str = "adapter_names") -> List[str]:
        if isinstance(names, str):
            names = [names]
        names = list(names)
        missing = [n for n in names if n not in self._lora.adapters]
        if missing:
            raise ValueError(f"{what}: no adapter named {missing}; loaded adapters: {list(self._lora.adapters)}")
        return names

    def set_adapters(self, adapter_names: Union[str, List[str]], adapter_weights=None) -> None:
        """Make ``adapter_names`` the active adapters, with ``adapter_weights`` (a number, a list with one
        number or ``{component: number}`` dict per adapter, or None for 1.0)."""
        names = self._lora_check_names(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float, Mapping)):
            adapter_weights = [adapter_weights] * len(names)
        adapter_weights = list(adapter_weights)
        if len(adapter_weights) != len(names):
            raise ValueError(
                f"adapter_weights: expected one weight per adapter ({len(names)}), got {len(adapter_weights)}"
            )
        weights = {}
        for name, w in zip(names, adapter_weights):
            per = {c: 1.0 for c in self._lora_loadable_modules}
            if isinstance(w, Mapping):
                unknown = sorted(set(w) - set(per))
                if unknown:
                    raise ValueError(f"adapter_weights: unknown components {unknown}; expected some of {list(per)}")
                per.update({c: 1.0 if v is None else float(v) for c, v in w.items()})
            elif w is not None:
                if not isinstance(w, (int, float)):
                    raise TypeError(f"adapter_weights: expected numbers, dicts or None, got {w!r}")
                per = {c: float(w) for c in per}
            weights[name] = per
        state = self._lora
        state.weights.update(weights)
        state.active = names
        self._lora_apply()

    def get_active_adapters(self) -> List[str]:
        return list(self._lora.active)

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """``{component: [adapter names]}``, as diffusers'."""
        out: Dict[str, List[str]] = {}
        for name, placed in self._lora.adapters.items():
            for component in placed:
                out.setdefault(component, []).append(name)
        return out

    def disable_lora(self) -> None:
        """Run without the (unfused) adapters; fused weights stay fused (``unfuse_lora`` first)."""
        self._lora.enabled = False
        self._lora_apply()

    def enable_lora(self) -> None:
        self._lora.enabled = True
        self._lora_apply()

    def delete_adapters(self, adapter_names: Union[str, List[str]]) -> None:
        names = self._lora_check_names(adapter_names)
        models = self._lora_models()
        for component, model in models.items():
            for path, layer in lora_layers_of(model):
                if any(n in layer.fused for n in names):
                    raise ValueError(f"delete_adapters: {names} are fused into the weights; call unfuse_lora() first")
        state = self._lora
        for name in names:
            for component, paths in state.adapters.pop(name).items():
                model = models[component]
                for path in paths:
                    layer = model.get_submodule(path)
                    layer.delete_adapter(name)
                    if not layer.adapter_names():
                        layer.unfuse()
                        _replace_submodule(model, path, layer.base_layer)
            state.weights.pop(name, None)
        state.active = [n for n in state.active if n not in names]
        if not state.adapters:
            self._lora_remove_hooks()
        self._lora_refresh_layers()
        self._lora_apply()

    # ---- fusing -----------------------------------------------------------------------------

    def fuse_lora(
        self,
        components: Optional[List[str]] = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Optional[List[str]] = None,
        **kwargs,
    ) -> None:
        """Add the active adapters (or ``adapter_names``), times ``lora_scale`` and their adapter weights,
        into the weights in place. ``unfuse_lora`` restores the weights bitwise."""
        if kwargs:
            raise TypeError(f"fuse_lora: unexpected arguments {sorted(kwargs)}")
        state = self._lora
        names = self._lora_check_names(adapter_names) if adapter_names is not None else list(state.active)
        models = self._lora_models()
        components = self._lora_check_components(components)
        plan = []
        for component in components:
            for path, layer in lora_layers_of(models[component]):
                here = [n for n in names if n in layer.lora_A]
                again = [n for n in here if n in layer.fused]
                if again:
                    raise ValueError(f"fuse_lora: {again} are already fused; call unfuse_lora() first")
                if here:
                    plan.append((layer, here, [lora_scale * state.weights[n][component] for n in here]))
        if safe_fusing:
            for layer, here, scales in plan:
                total = layer.weight.float() + sum(s * layer.delta_weight(n) for n, s in zip(here, scales))
                if not torch.isfinite(total).all():
                    raise ValueError(f"fuse_lora: fusing {here} gives non-finite weights (safe_fusing=True); nothing fused")
        for layer, here, scales in plan:
            layer.fuse(here, scales)
        self._lora_apply()

    def unfuse_lora(self, components: Optional[List[str]] = None, **kwargs) -> None:
        """Put the weights from before ``fuse_lora`` back, in place and bitwise."""
        models = self._lora_models()
        for component in self._lora_check_components(components):
            for _, layer in lora_layers_of(models[component]):
                layer.unfuse()
        self._lora_apply()

    def _lora_check_components(self, components) -> List[str]:
        available = list(self._lora_models())
        if components is None:
            return available
        unknown = [c for c in components if c not in self._lora_loadable_modules]
        if unknown:
            raise ValueError(f"components: unknown {unknown}; expected some of {self._lora_loadable_modules}")
        return [c for c in components if c in available]

    def unload_lora_weights(self) -> None:
        """Remove every adapter and put the original modules back. Weights fused with ``fuse_lora``
        stay fused, as in diffusers (``unfuse_lora`` first to get the originals back bitwise)."""
        for model in self._lora_models().values():
            for path, layer in lora_layers_of(model):
                layer.forget_fused()
                _replace_submodule(model, path, layer.base_layer)
        state = self._lora
        self._lora_remove_hooks()
        for attn in state.unfused_attention:
            attn.fuse_projections()
        object.__setattr__(self, "_lora_state", _LoraState())

    # ---- saving -----------------------------------------------------------------------------

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        unet_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        text_encoder_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function=None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata: Optional[dict] = None,
        text_encoder_lora_adapter_metadata: Optional[dict] = None,
    ) -> None:
        """Write a diffusers-format LoRA file (``unet.``/``text_encoder.`` prefixed keys, peft's
        LoraConfig per component in the safetensors metadata), which diffusers loads. The layer dicts
        come from :func:`get_lora_state_dict` (or peft's ``get_peft_model_state_dict``)."""
        cls._save_lora(
            save_directory,
            {"unet": unet_lora_layers, "text_encoder": text_encoder_lora_layers},
            {"unet": unet_lora_adapter_metadata, "text_encoder": text_encoder_lora_adapter_metadata},
            is_main_process, weight_name, save_function, safe_serialization,
        )  # fmt: skip

    @staticmethod
    def _save_lora(save_directory, layers, metadata, is_main_process, weight_name, save_function, safe_serialization):
        if not any(layers.values()):
            raise ValueError(f"save_lora_weights: pass at least one of {[f'{c}_lora_layers' for c in layers]}")
        state_dict, flat_meta = {}, {}
        for component, sd in layers.items():
            if not sd:
                continue
            for key, value in sd.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{component}_lora_layers[{key!r}]: expected a tensor, got {type(value).__name__}")
                state_dict[f"{component}.{key}"] = value.detach().contiguous()
            for field, value in (metadata.get(component) or {}).items():
                flat_meta[f"{component}.{field}"] = list(value) if isinstance(value, set) else value
        if not is_main_process:
            return
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: {save_directory!r} is a file; expected a folder")
        os.makedirs(save_directory, exist_ok=True)
        name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
        file = os.path.join(os.fspath(save_directory), name)
        if save_function is not None:
            save_function(state_dict, file)
        elif safe_serialization:
            from safetensors.torch import save_file

            meta = {"format": "pt"}
            if flat_meta:
                meta["lora_adapter_metadata"] = json.dumps(flat_meta, indent=2, sort_keys=True)
            save_file(state_dict, file, metadata=meta)
        else:
            if flat_meta:
                raise ValueError("save_lora_weights: adapter metadata needs safe_serialization=True")
            torch.save(state_dict, file)

    def save_lora_adapter(self, save_directory, adapter_name: str, weight_name: Optional[str] = None) -> None:
        """Save one loaded adapter (every component, with its alpha) as a diffusers-format file."""
        self._lora_check_names([adapter_name], "adapter_name")
        models = self._lora_models()
        layers = {c: get_lora_state_dict(m, adapter_name) for c, m in models.items()}
        metadata = {c: get_lora_adapter_metadata(m, adapter_name) for c, m in models.items()}
        self._save_lora(save_directory, layers, metadata, True, weight_name, None, True)

    # ---- applying the state to the layers ---------------------------------------------------

    def _lora_apply(self) -> None:
        """Tell every LoRA layer which adapters run unfused and with which scales; keep fused QKV right."""
        state = self._lora
        for component, layers in state.layers.items():
            for layer in layers:
                names = [n for n in state.active if n in layer.lora_A and n not in layer.fused] if state.enabled else []
                layer.set_active(names, [state.weights[n][component] for n in names])
        for module in state.attention:  # fused LoRA changed: the fused QKV weight, in place
            if module.fused_projections:
                _refresh_fused_projection(module)

    def _lora_sync_attention(self) -> None:
        """fastdiff.nn.Attention with fused projections: un-fuse where an unfused adapter runs on q/k/v,
        re-fuse where none does any more, and refresh the fused weight in place after a fused LoRA change.
        Runs at each UNet call (a forward pre-hook), not at each switch: fuse A -> unfuse -> fuse B
        with no image between never un-fuses the projections (the captured graph stays valid)."""
        state = self._lora
        for module in state.attention:
            sources = module._fused_sources()
            runs_lora = any(isinstance(s, LoRALayer) and s.active for s in sources)
            if runs_lora and module.fused_projections:
                module.unfuse_projections()
                state.unfused_attention.append(module)
            elif not runs_lora and module in state.unfused_attention:
                state.unfused_attention.remove(module)
                module.fuse_projections()
            elif module.fused_projections:
                _refresh_fused_projection(module)

    @contextlib.contextmanager
    def _lora_text_scale(self, lora_scale: Optional[float]):
        """Run the text encoders' LoRA layers at ``lora_scale`` inside the block (diffusers'
        ``encode_prompt(lora_scale=...)``); None: the call's ``cross_attention_kwargs["scale"]``."""
        state = self._lora
        previous, state.text_scale = state.text_scale, (None if lora_scale is None else float(lora_scale))
        try:
            yield
        finally:
            state.text_scale = previous

    def _lora_refresh_layers(self) -> None:
        state = self._lora
        state.layers = {c: [layer for _, layer in lora_layers_of(m)] for c, m in self._lora_models().items()}
        unet = getattr(self, "unet", None)
        state.attention = [
            m for m in (unet.modules() if unet is not None else ())
            if hasattr(m, "_fused_sources") and hasattr(m, "fused_projections")
            and (any(isinstance(s, LoRALayer) for s in m._fused_sources()) or m in state.unfused_attention)
        ]  # fmt: skip

    def _lora_install_hooks(self) -> None:
        state = self._lora
        if state.hooks:
            return
        pipe = weakref.ref(self)
        unet = getattr(self, "unet", None)
        if unet is not None:
            state.hooks.append(unet.register_forward_pre_hook(_unet_scale_hook(pipe), with_kwargs=True))
        for name in self._lora_loadable_modules:
            encoder = getattr(self, name, None)
            if name != "unet" and encoder is not None:
                state.hooks.append(encoder.register_forward_pre_hook(_text_encoder_scale_hook(pipe, name)))

    def _lora_remove_hooks(self) -> None:
        state = self._lora
        for handle in state.hooks:
            handle.remove()
        state.hooks = []


def _refresh_fused_projection(attn) -> None:
    """Rewrite a stale fused QKV weight of a fastdiff Attention in place (same tensor: a captured graph
    that reads it stays valid), instead of letting it be rebuilt as a new tensor."""
    weight = attn.__dict__.get("_buffers", {}).get("fused_weight")
    if weight is None or attn._fused_versions == attn._source_versions():
        return
    sources = attn._fused_sources()
    with torch.no_grad():
        weight.copy_(torch.cat([s.weight for s in sources]))
        bias = attn._buffers.get("fused_bias")
        if bias is not None:
            bias.copy_(torch.cat([s.bias for s in sources]))
    attn._fused_versions = attn._source_versions()


def _set_call_scale(layers, scale: float) -> None:
    for layer in layers:
        layer.call_scale = scale


def _unet_scale_hook(pipe_ref):
    def hook(unet, args, kwargs):
        pipe = pipe_ref()
        if pipe is None:
            return None
        state = pipe._lora
        extra = kwargs.get("cross_attention_kwargs") or {}
        _set_call_scale(state.layers.get("unet", ()), float(extra.get("scale", 1.0)))
        # q/k/v fused (before or after the LoRA was loaded): keep unfused adapters in the computation
        pipe._lora_sync_attention()
        return None

    return hook


def _text_encoder_scale_hook(pipe_ref, name):
    def hook(encoder, args):
        pipe = pipe_ref()
        if pipe is None:
            return None
        # encode_prompt's lora_scale, else the call's cross_attention_kwargs (the pipelines set
        # _cross_attention_kwargs before encode_prompt, as diffusers' do)
        scale = pipe._lora.text_scale
        if scale is None:
            scale = (pipe.__dict__.get("_cross_attention_kwargs") or {}).get("scale", 1.0)
        _set_call_scale(pipe._lora.layers.get(name, ()), float(scale))
        return None

    return hook


class StableDiffusionXLLoraLoaderMixin(StableDiffusionLoraLoaderMixin):
    """LoRA methods of the SDXL pipeline (adds the second text encoder)."""

    _lora_loadable_modules = ["unet", "text_encoder", "text_encoder_2"]

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        unet_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        text_encoder_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        text_encoder_2_lora_layers: Optional[Dict[str, torch.Tensor]] = None,
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function=None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata: Optional[dict] = None,
        text_encoder_lora_adapter_metadata: Optional[dict] = None,
        text_encoder_2_lora_adapter_metadata: Optional[dict] = None,
    ) -> None:
        """As :meth:`StableDiffusionLoraLoaderMixin.save_lora_weights`, with ``text_encoder_2``."""
        cls._save_lora(
            save_directory,
            {"unet": unet_lora_layers, "text_encoder": text_encoder_lora_layers,
             "text_encoder_2": text_encoder_2_lora_layers},
            {"unet": unet_lora_adapter_metadata, "text_encoder": text_encoder_lora_adapter_metadata,
             "text_encoder_2": text_encoder_2_lora_adapter_metadata},
            is_main_process, weight_name, save_function, safe_serialization,
        )  # fmt: skip
