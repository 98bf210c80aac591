"""Read LoRA state dicts in the formats people have, into one form: per component, per module path,
the down (A) and up (B) weights and alpha.

Formats (keys):

* diffusers/peft: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (also the older
  ``.lora.down.weight``/``.lora.up.weight``, ``.lora_linear_layer.down/up.weight`` and the
  attention-processor form ``...attn1.processor.to_q_lora.down.weight``), with the prefixes
  ``unet.``, ``text_encoder.``, ``text_encoder_2.``; alpha from the safetensors metadata
  ``lora_adapter_metadata`` (``unet.lora_alpha``, ``unet.alpha_pattern``) or ``.alpha`` keys;
  without either, alpha = rank (scale 1), as diffusers does for a uniform rank.
* kohya/A1111: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_`` (``lora_te1_``) for the text encoder and ``lora_te2_`` for SDXL's second one. The
  module path is matched against the model's own module names (diffusers' names, as kohya's SD1.x
  files use), or else read as the original (SGM/LDM) UNet's names that kohya's SDXL files use
  (``input_blocks_4_1_...``, ``middle_block_1_...``, ``output_blocks_...``, ``in_layers_2``, ...).

Nothing is dropped: every key either lands in an adapter or is reported as unknown.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

# (suffix, role): role "A" (down), "B" (up) or "alpha"
_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
_KOHYA_SUFFIXES = ((".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha"))
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
# old attention-processor LoRA names -> module names
_PROCESSOR_NAMES = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


@dataclasses.dataclass
class LoraEntry:
    """One module's LoRA: the down (A) and up (B) weights, alpha (None: alpha = rank), the source keys."""

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    keys: List[str] = dataclasses.field(default_factory=list)


def _split_suffix(key: str, suffixes) -> Tuple[Optional[str], Optional[str]]:
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None, None


def _module_lookup(model: nn.Module) -> Dict[str, str]:
    """module path -> module path for LoRA-able modules, under the aliases a file may use: the path
    itself, with/without transformers' ``text_model.`` level, and kohya's underscore form."""
    from fastdiff.loaders.lora_layers import LoRALayer

    lookup = {}
    inside = None  # named_modules is depth-first: a LoRALayer's own modules follow it directly
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue  # a LoRALayer's own base_layer / lora_A / lora_B
        if isinstance(module, LoRALayer):
            inside = path + "."
        elif not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        aliases = {path}
        if path.startswith("text_model."):
            aliases.add(path[len("text_model.") :])
        elif hasattr(model, "config") and hasattr(model.config, "vocab_size"):
            aliases.add("text_model." + path)
        for alias in list(aliases):
            aliases.add(alias.replace(".", "_"))
        for alias in aliases:
            lookup.setdefault(alias, path)
    return lookup


# the original (SGM/LDM) UNet's names inside blocks -> diffusers' (kohya's underscore form)
_SGM_RESNET = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
               ("skip_connection", "conv_shortcut"))  # fmt: skip
_SGM_TOP = (("time_embed_0", "time_embedding_linear_1"), ("time_embed_2", "time_embedding_linear_2"),
            ("label_emb_0_0", "add_embedding_linear_1"), ("label_emb_0_2", "add_embedding_linear_2"),
            ("input_blocks_0_0", "conv_in"), ("out_2", "conv_out"))  # fmt: skip


def sgm_to_diffusers(name: str, layers_per_block: int, lookup: Mapping[str, str]) -> Optional[str]:
    """A kohya SDXL UNet name in the original UNet's layout (underscored, no prefix) -> the diffusers
    module path in ``lookup``, or None. ``layers_per_block``: the UNet config's value."""
    for old, new in _SGM_TOP:
        if name == old:
            return lookup.get(new)

    def inner(prefix: str, rest: str, kind: str) -> Optional[str]:
        if kind == "resnets":
            for old, new in _SGM_RESNET:
                if rest == old:
                    rest = new
        elif kind == "samplers":
            rest = "conv"  # op (down) / conv (up)
        return lookup.get(f"{prefix}_{rest}")

    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        index, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = divmod(index - 1, layers_per_block + 1)
        if layer == layers_per_block:
            return inner(f"down_blocks_{block}_downsamplers_0", rest, "samplers")
        kind = "resnets" if sub == 0 else "attentions"
        return inner(f"down_blocks_{block}_{kind}_{layer}", rest, kind)
    m = re.fullmatch(r"middle_block_(\d+)_(.+)", name)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub == 1:
            return inner("mid_block_attentions_0", rest, "attentions")
        return inner(f"mid_block_resnets_{sub // 2}", rest, "resnets")
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        index, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = divmod(index, layers_per_block + 1)
        if sub == 0:
            return inner(f"up_blocks_{block}_resnets_{layer}", rest, "resnets")
        if sub == 1 and f"up_blocks_{block}_attentions_{layer}_proj_in" in lookup:
            return inner(f"up_blocks_{block}_attentions_{layer}", rest, "attentions")
        return inner(f"up_blocks_{block}_upsamplers_0", rest, "samplers")
    return None


def _alpha_from_metadata(metadata: Optional[Mapping], component: str, path: str) -> Optional[float]:
    if not metadata:
        return None
    config = metadata.get(component)
    if not config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", path):
            return float(alpha)
    if config.get("lora_alpha") is not None:
        return float(config["lora_alpha"])
    return None


def parse_metadata(raw: Optional[Mapping[str, str]]) -> Dict[str, dict]:
    """safetensors metadata -> {component: peft LoraConfig kwargs} (diffusers' ``lora_adapter_metadata``)."""
    if not raw or "lora_adapter_metadata" not in raw:
        return {}
    flat = json.loads(raw["lora_adapter_metadata"])
    out: Dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def split_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module],
    metadata: Optional[Mapping[str, dict]] = None,
):
    """-> ({component: {module path: LoraEntry}}, unknown keys). ``models``: component name -> model."""
    entries: Dict[str, Dict[str, LoraEntry]] = {}
    unknown: List[str] = []
    lookups = {name: _module_lookup(model) for name, model in models.items() if model is not None}
    prefixes = sorted(lookups, key=len, reverse=True)  # text_encoder_2 before text_encoder
    for key, value in state_dict.items():
        component = path = role = None
        for kohya_prefix, comp in _KOHYA_PREFIXES:
            if key.startswith(kohya_prefix):
                stem, role = _split_suffix(key[len(kohya_prefix) :], _KOHYA_SUFFIXES)
                component, path = comp, stem
                break
        else:
            for comp in prefixes:
                if key.startswith(comp + "."):
                    component = comp
                    path, role = _split_suffix(key[len(comp) + 1 :], _DIFFUSERS_SUFFIXES)
                    break
            else:
                if "unet" in lookups and not any(key.startswith(p) for p in ("text_encoder", "lora_te")):
                    component = "unet"  # diffusers treats un-prefixed keys as the UNet's
                    path, role = _split_suffix(key, _DIFFUSERS_SUFFIXES)
        if path is not None and ".processor." in path:
            head, _, proc = path.rpartition(".processor.")
            path = f"{head}.{_PROCESSOR_NAMES[proc]}" if proc in _PROCESSOR_NAMES else None
        if component not in lookups or path is None:
            unknown.append(key)
            continue
        module_path = lookups[component].get(path)
        if module_path is None and component == "unet" and key.startswith("lora_unet_"):
            layers = getattr(getattr(models["unet"], "config", None), "layers_per_block", None)
            if isinstance(layers, int):
                module_path = sgm_to_diffusers(path, layers, lookups["unet"])
        if module_path is None:
            unknown.append(key)
            continue
        entry = entries.setdefault(component, {}).setdefault(module_path, LoraEntry())
        entry.keys.append(key)
        if role == "A":
            entry.down = value
        elif role == "B":
            entry.up = value
        else:
            entry.alpha = float(value.float().item()) if isinstance(value, torch.Tensor) else float(value)
    for component, by_path in entries.items():
        for module_path, entry in by_path.items():
            if entry.alpha is None:
                entry.alpha = _alpha_from_metadata(metadata, component, module_path)
    return entries, unknown


def check_entries(entries: Mapping[str, Mapping[str, LoraEntry]], models: Mapping[str, nn.Module]) -> List[str]:
    """Problems (missing halves, shapes that do not fit the module), one line each; [] when all fit."""
    from fastdiff.loaders.lora_layers import LoRALayer, expected_lora_shapes

    problems = []
    for component, by_path in entries.items():
        model = models[component]
        for path, entry in by_path.items():
            if entry.down is None or entry.up is None:
                problems.append(f"{component}.{path}: needs both the down (lora_A) and up (lora_B) weights; got {entry.keys}")
                continue
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, LoRALayer) else module
            rank = entry.down.shape[0]
            want_a, want_b = expected_lora_shapes(base, rank)
            got_a, got_b = tuple(entry.down.shape), tuple(entry.up.shape)
            # 1x1 convolutions and linears are interchangeable (kohya stores proj_in both ways)
            fits = got_a == want_a or (entry.down.numel() == _prod(want_a) and _squeeze(got_a) == _squeeze(want_a))
            fits = fits and (got_b == want_b or (entry.up.numel() == _prod(want_b) and _squeeze(got_b) == _squeeze(want_b)))
            if not fits:
                problems.append(
                    f"{component}.{path} ({type(base).__name__}): expected lora_A {want_a} and lora_B {want_b} for rank "
                    f"{rank}, got {got_a} and {got_b}"
                )
    return problems


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _squeeze(shape) -> tuple:
    return tuple(s for s in shape if s != 1)
