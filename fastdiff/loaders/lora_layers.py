"""LoRA layers: a small module around ``nn.Linear`` / ``nn.Conv2d`` holding any number of adapters.

``LoRALayer(base)`` replaces ``base`` on the model instance (``unet...attn1.to_q`` becomes a
``LoRALayer`` whose ``base_layer`` is the original module). Its adapters use peft's names
(``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``), so the per-adapter state_dict is the one
diffusers' ``save_lora_weights`` writes. The forward is peft's::

    out = base_layer(x) + sum over active, unfused adapters a of  lora_B[a](lora_A[a](x)) * scale[a] * call_scale

* ``scale[a]`` (alpha / rank times the adapter weight of ``set_adapters``) lives in the device
  buffer ``lora_scales``: a new weight for the same active adapters is written **in place**, so a
  captured CUDA graph reads the new value with no recapture. A change of *which* adapters run
  changes the code path, so it allocates a new buffer: the graph runner sees a new tensor and
  recaptures (never a stale graph).
* ``call_scale`` is the per-call ``cross_attention_kwargs={"scale": s}`` (a Python number, as in
  diffusers; a graph runner keys on it).
* :meth:`fuse` adds the active adapters' deltas into ``base_layer.weight`` **in place** (keeping a
  copy of the original weight), :meth:`unfuse` copies the original back in place (bitwise).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn


class LoRALayer(nn.Module):
    """Adapters around one ``nn.Linear`` or ``nn.Conv2d`` (``base_layer``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRALayer: expected an nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.alpha_scale: Dict[str, float] = {}  # adapter -> alpha / rank
        self.active: tuple = ()  # adapters the forward runs (unfused), in order
        self.fused: tuple = ()  # adapters added into base_layer.weight
        self.call_scale = 1.0
        self._original_weight: Optional[torch.Tensor] = None
        self.register_buffer("lora_scales", torch.zeros(0, device=base_layer.weight.device), persistent=False)

    # the base layer's parameters, as peft exposes them (fastdiff.nn.Attention.fuse_projections reads them)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    def add_adapter(self, name: str, down: torch.Tensor, up: torch.Tensor, alpha: Optional[float]) -> None:
        """Add adapter ``name`` from its down (A) and up (B) weights; ``alpha`` None means alpha = rank."""
        base = self.base_layer
        rank = down.shape[0]
        weight = base.weight
        if self.is_conv:
            a = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            b = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            a = nn.Linear(base.in_features, rank, bias=False)
            b = nn.Linear(rank, base.out_features, bias=False)
        a.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
        b.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
        with torch.no_grad():
            a.weight.copy_(down.reshape(a.weight.shape))
            b.weight.copy_(up.reshape(b.weight.shape))
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.alpha_scale[name] = 1.0 if alpha is None else float(alpha) / rank

    def delete_adapter(self, name: str) -> None:
        del self.lora_A[name]
        del self.lora_B[name]
        del self.alpha_scale[name]

    def adapter_names(self):
        return list(self.lora_A.keys())

    def set_active(self, names: Sequence[str], scales: Sequence[float]) -> None:
        """Run ``names`` (unfused) with per-adapter ``scales`` (adapter weight; alpha / rank is applied here).
        Same adapters as before: the scales are written in place. Others: a new scales buffer."""
        names = tuple(names)
        values = [float(s) * self.alpha_scale[n] for n, s in zip(names, scales)]
        device = self.base_layer.weight.device
        if names != self.active or self.lora_scales.device != device:
            self.lora_scales = torch.tensor(values, dtype=torch.float32, device=device)
            self.active = names
        elif names:
            new = torch.tensor(values, dtype=torch.float32)
            if not torch.equal(new, self.lora_scales.detach().cpu()):
                with torch.no_grad():
                    self.lora_scales.copy_(new)

    def delta_weight(self, name: str) -> torch.Tensor:
        """alpha / rank * B @ A, shaped like ``base_layer.weight``, in float32."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = b.flatten(1) @ a.flatten(1)
        return (delta * self.alpha_scale[name]).reshape(self.base_layer.weight.shape)

    def fuse(self, names: Sequence[str], scales: Sequence[float]) -> None:
        """Add the adapters' deltas (times ``scales``) into ``base_layer.weight`` in place, on top of
        what is fused already; the first fuse keeps a copy of the original weight for :meth:`unfuse`."""
        weight = self.base_layer.weight
        with torch.no_grad():
            if self._original_weight is None:
                self._original_weight = weight.detach().clone()
            total = weight.float()
            for name, scale in zip(names, scales):
                total = total + float(scale) * self.delta_weight(name)
            weight.copy_(total.to(weight.dtype))
        self.fused = tuple(self.fused) + tuple(names)

    def unfuse(self) -> None:
        """Copy the original weight back in place (bitwise)."""
        if self._original_weight is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._original_weight)
            self._original_weight = None
        self.fused = ()

    def forget_fused(self) -> None:
        """Keep the fused weights as the layer's own (``unload_lora_weights`` after ``fuse_lora``)."""
        self._original_weight = None
        self.fused = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for i, name in enumerate(self.active):
            delta = self.lora_B[name](self.lora_A[name](x.to(self.lora_A[name].weight.dtype)))
            scale = self.lora_scales[i]
            if self.call_scale != 1.0:
                scale = scale * self.call_scale
            out = out + (delta * scale).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={list(self.active)}, fused={list(self.fused)}"


def expected_lora_shapes(base: nn.Module, rank: int):
    if isinstance(base, nn.Conv2d):
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)
    return (rank, base.in_features), (base.out_features, rank)
