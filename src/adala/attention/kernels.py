"""Non-causal linear-attention math: O(N·d²) time, O(N·d + d²) memory, never an N×N matrix.

Sums and normaliser are accumulated in fp32 even under bf16/fp16 autocast, because a sum over
thousands of tokens in half precision loses the small terms and the normaliser can underflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-6

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = ELU(x) + 1: positive everywhere, the paper's default."""
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


FEATURE_MAPS: dict[str, FeatureMap] = {"elu": elu_plus_one, "relu": relu}


def linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """out = φq (φkᵀ v) / (φq · Σφk + eps) for already-mapped features.

    Shapes: phi_q (B, H, N, D), phi_k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv).
    The normaliser rides along as an extra column of ones on v, so K-sum and KᵀV are one matmul
    and numerator and denominator are one more: two passes over the tokens instead of four.
    """
    out_dtype = v.dtype
    with torch.autocast(device_type=v.device.type, enabled=False):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        phi_q, phi_k, v = phi_q.to(acc), phi_k.to(acc), v.to(acc)
        ones = torch.ones(*v.shape[:-1], 1, dtype=acc, device=v.device)
        kv = phi_k.transpose(-2, -1) @ torch.cat([v, ones], dim=-1)  # (B, H, D, Dv+1)
        qkv = phi_q @ kv  # (B, H, N, Dv+1)
        num, den = qkv[..., :-1], qkv[..., -1:]
        out = num / (den + eps)
    return out.to(out_dtype)
