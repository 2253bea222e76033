"""``focused``: FLatten Transformer's focused linear attention (Han et al. 2023).

φ(x) = ‖r‖ · r^p / ‖r^p‖ with r = ReLU(x / softplus(θ)) + 1e-6: the power p (``p=3``) keeps each feature's
norm but sharpens its direction, so similar q/k get relatively larger products — a kernel that focuses like
softmax does. θ (``feature_scale``, per head and channel as in the paper) starts at 0, a uniform scale that the
normaliser cancels. The paper's rank-restoring depthwise conv (``dwc=5``, shared by the heads)
runs over V on the patch grid and is added to the patch tokens' output; prefix tokens get none. Its weights
start at zero, so the swap starts as exactly focused linear attention on the teacher's q/k/v.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import renamed
from ..errors import ConfigError
from .base import KernelAttention
from .grid import patch_grid
from .ops import DEFAULT_EPS, linear_attention
from .registry import register

RELU_EPS = 1e-6


def focused_features(x: torch.Tensor, p: float) -> torch.Tensor:
    """‖r‖ r^p/‖r^p‖ for r = ReLU(x) + 1e-6; computed on r/max(r), so any p stays in range."""
    r = F.relu(x) + RELU_EPS
    u = (r / r.amax(-1, keepdim=True)) ** p
    return r.norm(dim=-1, keepdim=True) * u / u.norm(dim=-1, keepdim=True)


@register("focused")
class FocusedAttention(KernelAttention):
    uses_grid = True

    def __init__(
        self, attn: nn.Module, p: float = 3.0, dwc: int = 5, eps: float = DEFAULT_EPS, kernel: int | None = None,
        **options: Any
    ) -> None:
        # ``kernel`` was this option's name before 0.2 (as ``dwc`` in linear-elu: the depthwise conv's size)
        dwc = renamed("kernel", kernel, "dwc", dwc)
        super().__init__(attn, p=p, dwc=dwc, eps=eps, **options)
        if not p > 0:
            raise ConfigError(f"focused p must be > 0, got {p}")
        if isinstance(dwc, bool) or not isinstance(dwc, int) or dwc < 1 or dwc % 2 == 0:
            raise ConfigError(f"focused dwc must be a positive odd number, got {dwc!r}")
        kernel = dwc
        self.p = float(p)
        self.eps = float(eps)
        self.feature_scale = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel, padding=kernel // 2, groups=self.head_dim)
        nn.init.zeros_(self.dwc.weight)
        nn.init.zeros_(self.dwc.bias)
        self.grid: tuple[int, int] | None = None

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, heads, n, d = v.shape
        prefix, h, w = patch_grid(self, n)
        with torch.autocast(device_type=q.device.type, enabled=False):
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            scale = F.softplus(self.feature_scale.to(acc))
            phi_q = focused_features(q.to(acc) / scale, self.p)
            phi_k = focused_features(k.to(acc) / scale, self.p)
        out = linear_attention(phi_q, phi_k, v, self.eps)
        vg = v[:, :, prefix:].reshape(b * heads, h, w, d).permute(0, 3, 1, 2)
        conv = self.dwc(vg).permute(0, 2, 3, 1).reshape(b, heads, h * w, d)
        return torch.cat([out[:, :, :prefix], out[:, :, prefix:] + conv.to(out.dtype)], dim=2)
