"""Drop-in GroupNorm module backed by :func:`fastdiff.ops.group_norm`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastdiff.ops.group_norm import ACTIVATIONS, group_norm


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with an optional fused activation.

    Same constructor arguments, parameters and state_dict keys (``weight``,
    ``bias``) as ``torch.nn.GroupNorm``, so checkpoints load unchanged.
    ``activation="silu"`` applies SiLU in the same pass, replacing the
    ``GroupNorm`` -> ``SiLU`` pair found in diffusion UNets and VAEs.
    ``forward`` only calls the op, which picks the backend per call.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor, input_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_bias`` (N, C), if given, is added to x before the statistics
        (see :func:`fastdiff.ops.group_norm`)."""
        if input_bias is None:
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation, input_bias=input_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")

    @classmethod
    def from_torch(cls, norm: nn.GroupNorm, activation: Optional[str] = None) -> "GroupNorm":
        """A fastdiff GroupNorm with ``norm``'s configuration and parameters (shared, not copied).

        Pass ``activation="silu"`` when ``norm`` is followed by a SiLU that the
        caller removes; see :func:`fuse_group_norm_silu`.
        """
        if not isinstance(norm, nn.GroupNorm):
            raise ValueError(f"GroupNorm.from_torch: norm must be a torch.nn.GroupNorm, got {type(norm).__name__}")
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, activation, device="meta")
        new.weight = norm.weight
        new.bias = norm.bias
        new.train(norm.training)
        return new


def fuse_group_norm_silu(norm: nn.GroupNorm, act: nn.Module) -> GroupNorm:
    """Build one fused GroupNorm+SiLU from a ``GroupNorm`` followed by a ``SiLU``.

    Raises ValueError if ``act`` is not ``nn.SiLU``. The returned module shares
    ``norm``'s parameters, so the state_dict keys of ``norm`` still apply.
    """
    if not isinstance(act, nn.SiLU):
        raise ValueError(f"fuse_group_norm_silu: act must be torch.nn.SiLU, got {type(act).__name__}")
    return GroupNorm.from_torch(norm, activation="silu")
