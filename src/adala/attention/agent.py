"""``agent``: agent attention (Han et al., ECCV 2024) built from the teacher's own queries.

A small set of *agents* — the prefix queries (CLS, registers) and the patch queries average-pooled onto an
``agents``×``agents`` grid — stands between queries and keys:

    S = softmax_N(τ_a·s·A Kᵀ) V            (m × D: each agent's exact softmax attention over all N keys)
    out_i = softmax_m(τ_q·s·q_i Aᵀ) S       (each patch query mixes the agents it resembles)
    out_prefix = softmax_N(s·q_prefix Kᵀ) V   (prefix queries attend exactly: O(P·N))

Why this and not a fixed feature map: DINOv2's attention at 448²-896² is mostly *semantic* and global (a 7×7
window holds 10-40 % of a patch query's mass in most blocks; measured on the held-out photos), and φ(q)·φ(k)
with ELU+1 flattens as N grows (dilution), so a linear-elu swap starts at 0.71-0.77 relative attention error
per block. Both softmaxes here are exact and their sizes (m agents, N keys) are normalised away, so nothing
dilutes with resolution: the swap with no training is at 0.27-0.28 per block at both 448² and 896².

It is a linear attention in disguise — φ(q) = softmax(τ_q·s·q Aᵀ) is an m-dimensional positive feature map and
S the state — so it costs O(N·m·D), the same as linear-elu when m = D (8×8 agents for ViT's 64-wide heads).
Because pooling commutes with the qkv projection, the agents can be computed from the pooled block input
before any query exists, which lets the streamed CPU block (``models.linear_block``) run it in the same two
passes as linear attention (pass 1: online softmax of agents over key chunks; pass 2: queries against S).

``temperature`` (τ_q, τ_a): learnable per-head log-scales, 0 at init (exactly the construction above).
``dwc``: a depthwise conv on V over the patch grid, added to the patch outputs (the local detail ≤ m agents cannot
carry); ``dwc_grid``: its taps spread on grids wider than the one it was trained at (``grid.conv_dilation``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import KernelAttention, upcast
from .grid import conv_dilation, grid_conv, local_conv, patch_grid
from .registry import register


def cell_matrix(size: int, cells: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(cells, size) averaging matrix of ``adaptive_avg_pool``'s cells along one axis: cell i spans
    [⌊i·size/cells⌋, ⌈(i+1)·size/cells⌉). Written with comparisons, not the pooling op, so ONNX can export it."""
    i = torch.arange(cells, device=device).unsqueeze(1)
    r = torch.arange(size, device=device).unsqueeze(0)
    inside = (r >= (i * size) // cells) & (r < ((i + 1) * size + cells - 1) // cells)
    inside = inside.to(dtype)
    return inside / inside.sum(1, keepdim=True)


def pool_patch_grid(x: torch.Tensor, prefix: int, h: int, w: int, agents: int) -> torch.Tensor:
    """(..., N, C) tokens -> (..., agents², C): the patch tokens average-pooled onto an agents×agents grid
    (``adaptive_avg_pool2d``'s cells; a grid smaller than ``agents`` repeats patches). Two small matmuls over the
    grid's columns then rows, straight from strided rows (the streamed block pools its packed projection)."""
    grid = x[..., prefix:, :].unflatten(-2, (h, w))  # (..., h, w, C)
    rows, cols = cell_matrix(h, agents, x.dtype, x.device), cell_matrix(w, agents, x.dtype, x.device)
    across = torch.matmul(cols, grid)  # (..., h, agents, C)
    pooled = torch.matmul(rows, across.flatten(-2))  # (..., agents, agents·C)
    return pooled.unflatten(-1, (agents, x.shape[-1])).flatten(-3, -2)


def kmeans_stride(patches: int, points: int) -> int:
    """Stride of the square subgrid the Lloyd iterations run on: about ``points`` patches (at least that many),
    all of them when ``points`` is 0. k-means then costs the same at every resolution (64 centres are well
    estimated from ~1 000 points; measured: 0.252 vs 0.249 swap error at 896² from a 2× strided subgrid). Every
    patch (0) is still O(N) and costs ~5 % of the speed at 896²; a trained student's CLS token, which attends
    exactly, gained 0.011 held-out cosine at 896² from it (README, reference measurement)."""
    return max(1, math.isqrt(patches // points)) if points else 1


def subgrid(x: torch.Tensor, prefix: int, h: int, w: int, stride: int) -> torch.Tensor:
    """(..., N, C) tokens -> (..., h'·w', C): the patches at every ``stride``-th row and column."""
    grid = x[..., prefix:, :].unflatten(-2, (h, w))
    return grid[..., ::stride, ::stride, :].flatten(-3, -2)


def lloyd(x: torch.Tensor, centres: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd iterations (k-means, Euclidean) of (B, H, N, D) points from (B, H, m, D) centres; an empty
    cluster keeps its centre. Assignments carry no gradient; the centres are means of ``x``."""
    for _ in range(iterations):
        with torch.no_grad():
            nearest = (x @ centres.transpose(-2, -1) - 0.5 * centres.pow(2).sum(-1).unsqueeze(-2)).argmax(-1)
            onehot = F.one_hot(nearest, centres.shape[2]).to(x.dtype)  # (B, H, N, m)
        count = onehot.sum(2).unsqueeze(-1)
        centres = torch.where(count > 0, (onehot.transpose(-2, -1) @ x) / count.clamp_min(1), centres)
    return centres


@register("agent")
class AgentAttention(KernelAttention):
    uses_grid = True

    def __init__(self, attn: nn.Module, agents: int = 8, temperature: bool = True, dwc: int = 0, kmeans: int = 2,
                 kmeans_points: int = 1024, dwc_grid: int = 0, **options: Any) -> None:
        if isinstance(agents, bool) or not isinstance(agents, int) or agents < 1:
            raise ConfigError(f"agent agents must be a positive integer (agents per grid side), got {agents!r}")
        if not isinstance(temperature, bool):
            raise ConfigError(f"temperature must be true or false, got {temperature!r}")
        if isinstance(kmeans, bool) or not isinstance(kmeans, int) or kmeans < 0:
            raise ConfigError(f"agent kmeans must be a number of Lloyd iterations >= 0, got {kmeans!r}")
        if isinstance(kmeans_points, bool) or not isinstance(kmeans_points, int) or kmeans_points < 0:
            raise ConfigError(f"agent kmeans_points must be >= 0 (0: every patch), got {kmeans_points!r}")
        extra = {"dwc_grid": dwc_grid} if dwc_grid else {}  # configs written before the option stay unchanged
        super().__init__(attn, agents=agents, temperature=temperature, dwc=dwc, kmeans=kmeans,
                         kmeans_points=kmeans_points, **extra, **options)
        self.kmeans, self.kmeans_points = kmeans, kmeans_points
        self.dwc, self.dwc_grid = local_conv(self.attn_dim, dwc, dwc_grid), dwc_grid
        self.agents = agents
        # (2, H, 1, 1): log τ_q (queries -> agents) and log τ_a (agents -> keys)
        self.log_tau = nn.Parameter(torch.zeros(2, self.num_heads, 1, 1)) if temperature else None
        self.grid: tuple[int, int] | None = None

    def temperatures(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(τ_q·s, τ_a·s): the logit scales of the two softmaxes, per head (H, 1, 1) when learnable."""
        s = float(self.scale)
        if self.log_tau is None:
            return s, s
        tau = self.log_tau.exp() * s
        return tau[0], tau[1]

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prefix, h, w = patch_grid(self, q.shape[2])
        out_dtype = v.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = upcast(q, k, v)
            sq, sa = self.temperatures()
            pooled = pool_patch_grid(q, prefix, h, w, self.agents)
            if self.kmeans:
                stride = kmeans_stride(h * w, self.kmeans_points)
                pooled = lloyd(subgrid(q, prefix, h, w, stride), pooled, self.kmeans)
            agents = torch.cat([q[:, :, :prefix], pooled], dim=2)
            state = torch.softmax((agents * sa) @ k.transpose(-2, -1), dim=-1) @ v  # (B, H, m, D)
            out_patch = torch.softmax((q[:, :, prefix:] * sq) @ agents.transpose(-2, -1), dim=-1) @ state
            s = float(self.scale)
            out_prefix = torch.softmax((q[:, :, :prefix] * s) @ k.transpose(-2, -1), dim=-1) @ v
            if self.dwc is not None:
                b, heads, n, d = v.shape
                grid = v[:, :, prefix:].transpose(1, 2).reshape(b, h, w, heads * d).permute(0, 3, 1, 2)
                conv = grid_conv(self.dwc, grid, conv_dilation(h, w, self.dwc_grid))
                out_patch = out_patch + conv.flatten(2).view(b, heads, d, h * w).transpose(-2, -1)
        return torch.cat([out_prefix, out_patch], dim=2).to(out_dtype)

    def flops(self, n: int) -> dict[str, int]:
        """By ``adala.benchmark.flops``' convention (matmuls exact, softmax exps not counted), per head: the agents'
        and prefix rows' scores and states (2·2·R·N·D, R = 2P + m), the patch queries' scores and mixture
        (2·2·N·M·D, M = P + m), each Lloyd iteration's scores and sums over its Nₖ subgrid points (2·Nₖ·m·D + Nₖ·D),
        the pooling's column pass (2·Nₚ·a·D) and the ``dwc`` conv (2·K²·Nₚ·D)."""
        p = self.num_prefix_tokens
        m, d, heads, n_p = self.agents**2, self.head_dim, self.num_heads, max(n - self.num_prefix_tokens, 0)
        side = math.isqrt(n_p)  # the FLOP model is for square grids
        n_k = len(range(0, side, kmeans_stride(n_p, self.kmeans_points))) ** 2
        out = {
            "agents": 4 * (2 * p + m) * n * d * heads,
            "queries": 4 * n_p * (p + m) * d * heads,
            "kmeans": self.kmeans * (2 * n_k * m * d + n_k * d) * heads,
            "pooling": 2 * n_p * self.agents * d * heads,
        }
        if self.dwc is not None:
            out["dwc"] = 2 * self.dwc.kernel_size[0] * self.dwc.kernel_size[1] * n_p * d * heads
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grid={self.grid}"
