"""Timestep embeddings used by the UNets (same math and parameter names as diffusers)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def get_timestep_embedding(
    timesteps: torch.Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal timestep embeddings (DDPM, Ho et al. 2020, after the Transformer's positional encoding).

    Args:
        timesteps: (N,) timesteps, possibly fractional.
        embedding_dim: output width; an odd width is zero-padded by one column.
        flip_sin_to_cos: order the halves as (cos, sin) instead of (sin, cos).
        downscale_freq_shift: frequencies are ``max_period ** (-i / (half - shift))``.
    Returns:
        (N, embedding_dim) float32 tensor.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps: expected a 1-D tensor, got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of (log) noise levels, as in score-SDE. ``weight`` is frozen."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = True, flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        proj = x[:, None] * self.weight[None, :] * 2 * math.pi
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def get_activation(name: str) -> nn.Module:
    """The activations diffusers' configs name, as modules."""
    activations = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}
    if name not in activations:
        raise ValueError(f"act_fn: expected one of {sorted(activations)}, got {name!r}")
    return activations[name]()


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the projected timestep: ``linear_1 -> act -> linear_2 (-> post_act)``.

    ``cond_proj`` (when ``cond_proj_dim`` is set) adds a projected guidance embedding
    to the input first, as LCM-distilled UNets do with ``timestep_cond``.
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: Optional[int] = None,
        post_act_fn: Optional[str] = None,
        cond_proj_dim: Optional[int] = None,
        sample_proj_bias: bool = True,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, sample_proj_bias)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond: this model has no time_cond_proj_dim, so it takes no timestep_cond")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample
