"""The spatial transformer of Stable Diffusion UNets, with diffusers' parameter names.

``Transformer2DModel`` (continuous input only) -> ``BasicTransformerBlock``
(self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm and
residual). Attention goes through ``fastdiff.nn.Attention``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from fastdiff.models.modeling_utils import call_maybe_checkpointed
from fastdiff.nn import Attention, GroupNorm
from fastdiff.ops.geglu import geglu


class GEGLU(nn.Module):
    """``h * gelu(g)`` where ``(h, g)`` are the two halves of one projection (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The reference backend multiplies into gelu's output in place when no grad is recorded.
        return geglu(self.proj(hidden_states))


class FeedForward(nn.Module):
    """``net = [GEGLU(dim, inner), Dropout, Linear(inner, dim_out)]``, as diffusers names it."""

    def __init__(
        self,
        dim: int,
        dim_out: Optional[int] = None,
        mult: int = 4,
        dropout: float = 0.0,
        activation_fn: str = "geglu",
        inner_dim: Optional[int] = None,
        bias: bool = True,
    ):
        super().__init__()
        if activation_fn != "geglu":
            raise ValueError(f"activation_fn: only 'geglu' is supported, got {activation_fn!r}")
        inner_dim = inner_dim or int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner_dim, bias=bias), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim, bias=bias)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, optional cross-attention, GEGLU feed-forward.

    With ``only_cross_attention`` the first attention also attends to the encoder states
    and there is no second attention.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: Optional[int] = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(
            query_dim=dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            dropout=dropout,
            bias=attention_bias,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None,
            upcast_attention=upcast_attention,
        )
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(
                query_dim=dim,
                cross_attention_dim=cross_attention_dim if not double_self_attention else None,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
                dropout=dropout,
                bias=attention_bias,
                upcast_attention=upcast_attention,
            )
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """``cross_attention_kwargs`` go to both attentions' processors as keywords, as
        diffusers' BasicTransformerBlock passes them (a processor that does not take
        one drops it with a warning, see :meth:`fastdiff.nn.Attention.forward`)."""
        kwargs = cross_attention_kwargs or {}
        # As in diffusers, attn1 takes attention_mask even when only_cross_attention makes it
        # attend to the encoder states.
        context = encoder_hidden_states if self.only_cross_attention else None
        # Residual adds go in place on each sublayer's fresh output (a Linear or Dropout
        # output, which their backward passes do not need).
        hidden_states = self.attn1(self.norm1(hidden_states), context, attention_mask, **kwargs).add_(hidden_states)
        if self.attn2 is not None:
            hidden_states = self.attn2(
                self.norm2(hidden_states), encoder_hidden_states, encoder_attention_mask, **kwargs
            ).add_(hidden_states)
        return self.ff(self.norm3(hidden_states)).add_(hidden_states)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> BasicTransformerBlocks over the H*W tokens -> proj_out, plus the input.

    ``use_linear_projection`` (SD2, SDXL) makes proj_in/proj_out Linear layers on the
    tokens; otherwise they are 1x1 convolutions on the feature map (SD1).
    The number of heads comes first, as in diffusers.
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: Optional[int] = None,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        attention_type: str = "default",
    ):
        super().__init__()
        if in_channels is None:
            raise ValueError("in_channels: Transformer2DModel here takes continuous (image-like) input only")
        if attention_type != "default":
            raise ValueError(f"attention_type: only 'default' is supported, got {attention_type!r}")
        inner_dim = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.use_linear_projection = use_linear_projection
        self.gradient_checkpointing = False

        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    cross_attention_dim=cross_attention_dim,
                    activation_fn=activation_fn,
                    attention_bias=attention_bias,
                    only_cross_attention=only_cross_attention,
                    double_self_attention=double_self_attention,
                    upcast_attention=upcast_attention,
                    norm_elementwise_affine=norm_elementwise_affine,
                    norm_eps=norm_eps,
                )
                for _ in range(num_layers)
            ]
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, self.out_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, self.out_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """hidden_states: (B, C, H, W). encoder_hidden_states: (B, L, cross_attention_dim).
        cross_attention_kwargs: keywords for every attention processor (see BasicTransformerBlock).

        Masks are additive biases broadcastable to the attention scores, as the UNet
        prepares them.
        """
        if hidden_states.dim() != 4 or hidden_states.shape[1] != self.in_channels:
            raise ValueError(
                f"hidden_states: expected (B, {self.in_channels}, H, W), got {tuple(hidden_states.shape)}"
            )
        batch, _, height, width = hidden_states.shape
        # Tokens are (B, H*W, C): a free view when the input is channels_last.
        memory_format = (
            torch.channels_last
            if hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous()
            else torch.contiguous_format
        )
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)

        for block in self.transformer_blocks:
            hidden_states = call_maybe_checkpointed(
                block,
                self,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                encoder_attention_mask,
                cross_attention_kwargs,
            )

        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        hidden_states = hidden_states.contiguous(memory_format=memory_format)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states.add_(residual)
