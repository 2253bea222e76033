"""Kernel linear attention with a fixed feature map: ``linear-elu`` (paper default), ``linear-relu``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import KernelAttention
from .kernels import DEFAULT_EPS, FEATURE_MAPS, linear_attention
from .registry import register


class LinearAttention(KernelAttention):
    feature_map_name = "elu"

    def __init__(self, attn: nn.Module, eps: float = DEFAULT_EPS, **options: Any) -> None:
        super().__init__(attn, eps=eps, **options)
        self.eps = float(eps)
        self.feature_map = FEATURE_MAPS[self.feature_map_name]

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linear_attention(self.feature_map(q), self.feature_map(k), v, self.eps)


@register("linear-elu")
class LinearEluAttention(LinearAttention):
    kind = "linear-elu"
    feature_map_name = "elu"


@register("linear-relu")
class LinearReluAttention(LinearAttention):
    kind = "linear-relu"
    feature_map_name = "relu"
