"""Exact softmax attention: the identity swap, and the kind kept in hybrid models.

Follows timm's own two code paths (SDPA or explicit) so the swap is bit-identical in eval.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import KernelAttention
from .registry import register


@register("softmax")
class SoftmaxAttention(KernelAttention):
    def __init__(self, attn: nn.Module, **options: Any) -> None:
        super().__init__(attn, **options)
        self.fused = bool(getattr(attn, "fused_attn", True))
        self.attn_drop = getattr(attn, "attn_drop", nn.Dropout(0.0))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused:
            p = self.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.attn_drop(attn) @ v
