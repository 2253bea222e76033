"""``performer``: FAVOR+ positive orthogonal random features (Choromanski et al. 2021).

φ(x) = (exp(w·x − |x|²/2 − c) + kernel_eps)/√m on x = √scale·q (resp. k), so E[φ(q)·φ(k)] ∝ exp(scale·q·k):
an unbiased estimate of the softmax kernel (up to the 1e-4 floor), with error falling like 1/√m. At DINOv2's
q/k norms the estimator is noisy (64 features: further from the teacher than linear-elu right after the swap).
c is a stabiliser (the largest exponent, so the largest feature is 1): per query its own max (cancelled by the
normaliser), for keys the max over all keys of the (batch, head). The m×D projection (blocks of random
orthogonal rows with Gaussian-norm lengths) is a buffer, so it is saved with the model and a reload is
deterministic; it is drawn from ``seed`` (every block gets the same draw unless seeds differ) and, with
``redraw=True``, redrawn at every training-mode forward (``redraw_features()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import KernelAttention
from .ops import DEFAULT_EPS, linear_attention
from .registry import register

KERNEL_EPS = 1e-4  # as performer-pytorch: keeps every feature > 0, so a query never sees an all-zero normaliser


def orthogonal_gaussian_projection(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(m, d) rows: orthonormal within each block of d, each row rescaled to a Gaussian vector's norm."""
    blocks = []
    for start in range(0, m, d):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(qmat.T[: min(d, m - start)])
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return torch.cat(blocks, dim=0) * norms


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, is_query: bool, kernel_eps: float = KERNEL_EPS
) -> torch.Tensor:
    """Positive random features of already √scale-scaled x (B, H, N, D) -> (B, H, N, m)."""
    z = x @ projection.transpose(0, 1).to(x.dtype) - 0.5 * (x * x).sum(-1, keepdim=True)
    c = z.amax(-1, keepdim=True) if is_query else z.amax(dim=(-2, -1), keepdim=True)
    return ((z - c.detach()).exp() + kernel_eps) * projection.shape[0] ** -0.5


@register("performer")
class PerformerAttention(KernelAttention):
    def __init__(
        self,
        attn: nn.Module,
        features: int = 64,
        redraw: bool = False,
        seed: int = 0,
        eps: float = DEFAULT_EPS,
        **options: Any,
    ) -> None:
        super().__init__(attn, features=features, redraw=redraw, seed=seed, eps=eps, **options)
        if int(features) < 1:
            raise ConfigError(f"performer features must be >= 1, got {features}")
        self.features = int(features)
        self.redraw = bool(redraw)
        self.seed = int(seed)
        self.eps = float(eps)
        self.draws = 0
        self.register_buffer("projection", self._draw(), persistent=True)

    def _draw(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        return orthogonal_gaussian_projection(self.features, self.head_dim, g)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """A fresh projection (a new tensor, not in place: graphs still holding the old one stay valid)."""
        self.draws += 1
        self.projection = self._draw().to(self.projection)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.training and self.redraw:
            self.redraw_features()
        with torch.autocast(device_type=q.device.type, enabled=False):
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            root = float(self.scale) ** 0.5
            proj = self.projection.to(acc)
            phi_q = favor_features(q.to(acc) * root, proj, is_query=True)
            phi_k = favor_features(k.to(acc) * root, proj, is_query=False)
        return linear_attention(phi_q, phi_k, v, self.eps)
