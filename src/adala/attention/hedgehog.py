"""``hedgehog``: a learnable feature map trained to mimic softmax (Zhang et al. 2024, "The Hedgehog &
the Porcupine").

Each head maps q and k through its own linear map W (head_dim → feature_dim), then takes a softmax over
the 2·feature_dim features [xW, −xW]. The map starts as √scale·(random orthogonal) — see
``HeadwiseLinear`` for why: at that start φ(q)·φ(k) is a positive-random-feature estimate of
exp(scale·q·k), i.e. the swap already approximates the teacher's softmax, and stage 1 sharpens it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import KernelAttention
from .ops import DEFAULT_EPS, linear_attention
from .registry import register

INITS = ("orthogonal", "identity")


class HeadwiseLinear(nn.Module):
    """One (head_dim → features) matrix per head: ``weight`` is (H, head_dim, features).

    Init ``orthogonal`` (default): W = √scale · (stacked random orthogonal blocks, each column scaled to
    length √head_dim). With antithetic features [xW, −xW], Σ_j exp(w_j·q)exp(w_j·k) ≈ E[exp(w·(q+k))] =
    exp(|q|²/2)exp(|k|²/2)exp(q·k) (in the √scale units), and the softmax denominator of a key is
    ≈ const·exp(|k|²/2): so φ(q)·φ(k) ∝ exp(scale·q·k) up to a per-query factor, which the linear
    attention normaliser cancels — the FAVOR+ estimator with a learnable projection. ``identity`` (W =
    √scale·I, only when features == head_dim) is the simpler start some implementations use; it is a
    per-dimension kernel, much further from softmax (measured on DINOv2 activations).
    """

    def __init__(self, heads: int, head_dim: int, features: int, scale: float, init: str, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_dim, features))
        with torch.no_grad():
            if init == "identity":
                if features != head_dim:
                    raise ConfigError(f"hedgehog init='identity' needs feature_dim == head_dim ({head_dim})")
                self.weight.copy_(torch.eye(head_dim).expand(heads, -1, -1) * scale**0.5)
            else:
                g = torch.Generator().manual_seed(seed)
                w = torch.stack([_orthogonal_columns(head_dim, features, g) for _ in range(heads)])
                self.weight.copy_(w * scale**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, N, D) -> (B, H, N, F), in fp32 (the features are exponentiated next)."""
        return torch.einsum("bhnd,hdf->bhnf", x.float(), self.weight.float())


def _orthogonal_columns(d: int, m: int, g: torch.Generator) -> torch.Tensor:
    """(d, m): blocks of orthonormal columns, each rescaled to length √d (a Gaussian's typical norm)."""
    blocks = []
    for start in range(0, m, d):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        blocks.append(qmat[:, : min(d, m - start)])
    return torch.cat(blocks, dim=1) * d**0.5


def hedgehog_features(x_proj: torch.Tensor) -> torch.Tensor:
    """softmax over [+x, −x] along the feature axis: positive, bounded, overflow-free."""
    return torch.cat([x_proj, -x_proj], dim=-1).softmax(dim=-1)


@register("hedgehog")
class HedgehogAttention(KernelAttention):
    def __init__(
        self,
        attn: nn.Module,
        feature_dim: int | None = None,
        init: str = "orthogonal",
        seed: int = 0,
        eps: float = DEFAULT_EPS,
        **options: Any,
    ) -> None:
        super().__init__(attn, feature_dim=feature_dim, init=init, seed=seed, eps=eps, **options)
        if init not in INITS:
            raise ConfigError(f"hedgehog init must be one of {', '.join(INITS)}, got {init!r}")
        feature_dim = self.head_dim if feature_dim is None else int(feature_dim)
        if feature_dim < 1:
            raise ConfigError(f"hedgehog feature_dim must be >= 1, got {feature_dim}")
        self.feature_dim = feature_dim
        self.eps = float(eps)
        args = (self.num_heads, self.head_dim, feature_dim, float(self.scale), init)
        self.feature_map_q = HeadwiseLinear(*args, seed=int(seed))
        self.feature_map_k = HeadwiseLinear(*args, seed=int(seed))  # same start: φq·φk estimates exp(s·q·k)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):
            phi_q = hedgehog_features(self.feature_map_q(q))
            phi_k = hedgehog_features(self.feature_map_k(k))
        return linear_attention(phi_q, phi_k, v, self.eps)
