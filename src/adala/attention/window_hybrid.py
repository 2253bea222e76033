"""``window-hybrid``: exact softmax in a local 2-D window + linear attention for everything else (LoLCATs-style).

Every patch query attends *exactly* (exp scores) to the patches in its ``window``×``window`` neighbourhood on the
patch grid and to the prefix tokens (CLS/registers); all other patches contribute through ELU+1 linear attention.
Both share one normaliser (LoLCATs, Zhang et al. 2024):

    out_i = (Σ_exact a_ij v_j + Σ_far b_ij v_j) / (Σ_exact a_ij + Σ_far b_ij)
    a_ij = exp(scale·q_i·k_j − m_i)          (m_i = max over the exact set, so max a = 1)
    b_ij = γ_h · φ(q_i)·φ(k_j) / φ(q_i)·mean_patches(φ(k))

b is the linear kernel divided by its mean over the patch keys, so γ_h (learnable, per head) is "weight of an
average far patch relative to the best exact key" whatever the layer's activation scale. Its start (``gamma``,
0.003) is the best of 0.001…0.1 for DINOv2-S/14 at 112² and 224² (DINOv2 attention is peaked: far patches weigh
little next to the best local one). Prefix queries attend exactly to all N tokens (O(P·N)). The far sums are
(all patches) − (window), so nothing is N×N: window×window query blocks attend to their keys plus an r-wide halo
by dense batched matmuls, masked to each query's own window — O(N·(2·window−1)²·D). Scores and sums run in fp32.

Patch grid: a module's ``grid`` attribute (h, w), kept fresh by ``attach_patch_grid(model)`` (a forward hook on
``patch_embed``); without it the grid is assumed square and a non-square patch count is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import KernelAttention, upcast
from .grid import patch_grid
from .ops import DEFAULT_EPS, elu_plus_one
from .registry import register


def _window_mask(block: int, r: int, device: torch.device) -> torch.Tensor:
    """(block², (block+2r)²) bool: which halo keys lie in each block query's (2r+1)² window."""
    i = torch.arange(block, device=device)
    u = torch.arange(block + 2 * r, device=device)
    near = (u.view(1, -1) - r - i.view(-1, 1)).abs() <= r  # (block, block+2r), one axis
    return (near[:, None, :, None] & near[None, :, None, :]).reshape(block * block, -1)


def _halos(x: torch.Tensor, block: int, r: int, nbh: int, nbw: int) -> torch.Tensor:
    """(BH, hp+2r, wp+2r, C) padded grid -> (BH, nb, (block+2r)², C): each block's keys plus an r-wide rim."""
    size = block + 2 * r
    x = x.unfold(1, size, block).unfold(2, size, block)  # (BH, nbh, nbw, C, size, size), a view
    return x.permute(0, 1, 2, 4, 5, 3).reshape(x.shape[0], nbh * nbw, size * size, -1)


def _blocks(x: torch.Tensor, block: int, nbh: int, nbw: int) -> torch.Tensor:
    """(BH, hp, wp, C) -> (BH, nb, block², C) and back with ``_unblocks``."""
    bh, c = x.shape[0], x.shape[-1]
    x = x.reshape(bh, nbh, block, nbw, block, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(bh, nbh * nbw, block * block, c)


def _unblocks(x: torch.Tensor, block: int, nbh: int, nbw: int) -> torch.Tensor:
    bh, c = x.shape[0], x.shape[-1]
    x = x.reshape(bh, nbh, nbw, block, block, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(bh, nbh * block, nbw * block, c)


@register("window-hybrid")
class WindowHybridAttention(KernelAttention):
    uses_grid = True

    def __init__(
        self, attn: nn.Module, window: int = 7, gamma: float = 0.003, eps: float = DEFAULT_EPS, **options: Any
    ) -> None:
        super().__init__(attn, window=window, gamma=gamma, eps=eps, **options)
        window = int(window)
        if window < 1 or window % 2 == 0:
            raise ConfigError(f"window-hybrid window must be a positive odd number, got {window}")
        if not gamma > 0:
            raise ConfigError(f"window-hybrid gamma must be > 0, got {gamma}")
        self.window = window
        self.eps = float(eps)
        self.log_gamma = nn.Parameter(torch.full((self.num_heads,), math.log(gamma)))
        self.grid: tuple[int, int] | None = None

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prefix, h, w = patch_grid(self, q.shape[2])
        out_dtype = v.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = upcast(q, k, v)
            s = float(self.scale)
            out_prefix = torch.softmax((q[:, :, :prefix] * s) @ k.transpose(-2, -1), dim=-1) @ v
            out_patch = self._patch_queries(q[:, :, prefix:], k, v, prefix, h, w, s)
        return torch.cat([out_prefix, out_patch], dim=2).to(out_dtype)

    def _patch_queries(self, q, k, v, prefix: int, h: int, w: int, s: float) -> torch.Tensor:
        """Patch queries in window×window blocks; each block attends to its keys plus an r-wide halo by one
        dense matmul, masked to every query's own window (O(N·(2·window−1)²·D): linear in N)."""
        b, heads, n_p, d = q.shape
        bh, blk, r = b * heads, self.window, self.window // 2
        nbh, nbw = -(-h // blk), -(-w // blk)
        hp, wp = nbh * blk, nbw * blk
        kp, vp = k[:, :, prefix:], v[:, :, prefix:]
        ones = q.new_ones(b, heads, n_p, 1)
        v1 = torch.cat([vp, ones], -1)  # the normaliser rides along as a column of ones

        def grid(x: torch.Tensor, rim: int) -> torch.Tensor:  # (B,H,N_p,C) -> (BH, hp+2rim, wp+2rim, C)
            x = x.reshape(bh, h, w, -1)
            return F.pad(x, (0, 0, rim, rim + wp - w, rim, rim + hp - h))

        phi_q, phi_k = elu_plus_one(q), elu_plus_one(kp)
        # normalised linear kernel b_ij = γ φq·φk / (φq·mean φk), so γ is scale-free
        gamma = self.log_gamma.exp().to(q.dtype).view(1, heads, 1, 1)
        phi_q = phi_q * (gamma / (phi_q @ phi_k.mean(2, keepdim=True).transpose(-2, -1)))
        lin_kv = phi_k.transpose(-2, -1) @ v1  # (B,H,D,D+1): all patches

        qb = _blocks(grid(q, 0), blk, nbh, nbw)  # (BH, nb, blk², D)
        phi_qb = _blocks(grid(phi_q, 0), blk, nbh, nbw)
        kh = _halos(grid(kp, r), blk, r, nbh, nbw)  # (BH, nb, K², D)
        phi_kh = _halos(grid(phi_k, r), blk, r, nbh, nbw)
        v1h = _halos(grid(v1, r), blk, r, nbh, nbw)  # zero rows outside the grid: the ones column marks real keys
        inside = _window_mask(blk, r, q.device) & (v1h[:1, :, None, :, -1] > 0)  # (1, nb, blk², K²)

        scores = (qb @ kh.transpose(-2, -1)).mul(s).masked_fill(~inside, float("-inf"))
        pre = (qb * s) @ k[:, :, :prefix].reshape(bh, 1, prefix, d).transpose(-2, -1)  # (BH, nb, blk², P)
        m = scores.amax(-1, keepdim=True)
        if prefix:
            m = torch.maximum(m, pre.amax(-1, keepdim=True))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # padding queries may see no key at all
        a = (scores - m).exp()
        b_win = (phi_qb @ phi_kh.transpose(-2, -1)) * inside  # linear share of the window: taken out again
        num = (a - b_win) @ v1h + phi_qb @ lin_kv.reshape(bh, 1, d, d + 1)
        if prefix:
            v1_pre = torch.cat([v[:, :, :prefix], q.new_ones(b, heads, prefix, 1)], -1)
            num = num + (pre - m).exp() @ v1_pre.reshape(bh, 1, prefix, d + 1)
        num = _unblocks(num, blk, nbh, nbw)[:, :h, :w].reshape(b, heads, n_p, d + 1)
        return num[..., :-1] / (num[..., -1:] + self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grid={self.grid}"
