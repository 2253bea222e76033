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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import KernelAttention
from .grid import patch_grid
from .registry import register


def pool_patch_grid(x: torch.Tensor, prefix: int, h: int, w: int, agents: int) -> torch.Tensor:
    """(B, H, N, D) tokens -> (B, H, agents², D): the patch tokens average-pooled onto an agents×agents grid
    (``adaptive_avg_pool2d``'s cells; a grid smaller than ``agents`` repeats patches)."""
    b, heads, _, d = x.shape
    grid = x[:, :, prefix:].reshape(b * heads, h, w, d).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, agents)  # (BH, D, a, a)
    return pooled.flatten(2).transpose(1, 2).reshape(b, heads, agents * agents, d)


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
                 **options: Any) -> None:
        if isinstance(agents, bool) or not isinstance(agents, int) or agents < 1:
            raise ConfigError(f"agent agents must be a positive integer (agents per grid side), got {agents!r}")
        if not isinstance(temperature, bool):
            raise ConfigError(f"temperature must be true or false, got {temperature!r}")
        if isinstance(kmeans, bool) or not isinstance(kmeans, int) or kmeans < 0:
            raise ConfigError(f"agent kmeans must be a number of Lloyd iterations >= 0, got {kmeans!r}")
        if isinstance(dwc, bool) or not isinstance(dwc, int) or dwc < 0 or (dwc and dwc % 2 == 0):
            raise ConfigError(f"dwc must be 0 (off) or a positive odd kernel size, got {dwc!r}")
        super().__init__(attn, agents=agents, temperature=temperature, dwc=dwc, kmeans=kmeans, **options)
        self.kmeans = kmeans
        self.dwc = None
        if dwc:
            self.dwc = nn.Conv2d(self.attn_dim, self.attn_dim, dwc, padding=dwc // 2, groups=self.attn_dim)
            nn.init.zeros_(self.dwc.weight)
            nn.init.zeros_(self.dwc.bias)
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
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            q, k, v = q.to(acc), k.to(acc), v.to(acc)
            sq, sa = self.temperatures()
            pooled = pool_patch_grid(q, prefix, h, w, self.agents)
            if self.kmeans:
                pooled = lloyd(q[:, :, prefix:], pooled, self.kmeans)
            agents = torch.cat([q[:, :, :prefix], pooled], dim=2)
            state = torch.softmax((agents * sa) @ k.transpose(-2, -1), dim=-1) @ v  # (B, H, m, D)
            out_patch = torch.softmax((q[:, :, prefix:] * sq) @ agents.transpose(-2, -1), dim=-1) @ state
            s = float(self.scale)
            out_prefix = torch.softmax((q[:, :, :prefix] * s) @ k.transpose(-2, -1), dim=-1) @ v
            if self.dwc is not None:
                b, heads, n, d = v.shape
                grid = v[:, :, prefix:].transpose(1, 2).reshape(b, h, w, heads * d).permute(0, 3, 1, 2)
                conv = F.conv2d(grid, self.dwc.weight.to(acc), self.dwc.bias.to(acc), padding=self.dwc.padding,
                                groups=self.attn_dim)
                out_patch = out_patch + conv.flatten(2).view(b, heads, d, h * w).transpose(-2, -1)
        return torch.cat([out_prefix, out_patch], dim=2).to(out_dtype)

    def flops(self, n: int) -> dict[str, int]:
        """Agent logits and state (2·2·m·N·D), query logits and output (2·2·N·m·D), the two softmaxes'
        exps and sums (2·N·m), the prefix queries' exact row (4·P·N·D) and the pooling (N·D), per head."""
        m = self.agents**2 + self.num_prefix_tokens
        d, heads, p = self.head_dim, self.num_heads, self.num_prefix_tokens
        return {
            "agents": (4 * m * n * d + 2 * n * m) * heads,
            "queries": (4 * n * m * d + 2 * n * m) * heads,
            "prefix_exact": 4 * p * n * d * heads,
            "pooling": n * d * heads,
        }

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grid={self.grid}"
