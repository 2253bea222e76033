"""Mixing FLOPs of one attention module, by the counting convention of ``adala.benchmark.flops``.

They live beside the kinds, since a kind that mixes differently (RoPE, SAM's grid) describes itself with a
``flops(n)`` method built from these formulas; the benchmark's whole-model counter reuses them.
"""

from __future__ import annotations

from torch import nn

from .base import is_linear
from .linear import LinearAttention


def _heads(attn: nn.Module) -> tuple[int, int]:
    h = int(attn.num_heads)
    d = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // (3 * h))
    return h, d


def softmax_attention_flops(n: int, heads: int, head_dim: int) -> dict[str, int]:
    """QKᵀ and AV: 2·N²·D each per head (2·2·N²·D per head-layer)."""
    return {"scores": 2 * n * n * head_dim * heads, "weighted_sum": 2 * n * n * head_dim * heads}


def linear_attention_flops(n: int, heads: int, head_dim: int, feature_ops: int = 2) -> dict[str, int]:
    """φ on q and k (``feature_ops`` per element: ELU+1 = 2, ReLU = 1), KᵀV, Q(KᵀV), and the
    normaliser (Σφk, φq·Σφk, the division)."""
    d = head_dim
    return {
        "feature_map": feature_ops * 2 * n * d * heads,
        "kv": 2 * n * d * d * heads,
        "q_kv": 2 * n * d * d * heads,
        "normaliser": (n * d + 2 * n * d + n * d) * heads,
    }


def kind_flops(n: int, heads: int, head_dim: int, feature_map_name: str | None) -> dict[str, int]:
    """Softmax FLOPs when ``feature_map_name`` is None, else linear attention with that feature map."""
    if feature_map_name is None:
        return softmax_attention_flops(n, heads, head_dim)
    return linear_attention_flops(n, heads, head_dim, 2 if feature_map_name == "elu" else 1)


def attention_flops(attn: nn.Module, n: int) -> dict[str, int] | None:
    """Mixing FLOPs of one attention module at ``n`` tokens; None for a kind we cannot count.

    A kind can describe itself with a ``flops(n) -> dict[str, int]`` method.
    """
    if hasattr(attn, "flops") and callable(attn.flops):
        return dict(attn.flops(n))
    heads, d = _heads(attn)
    if not is_linear(attn):
        return softmax_attention_flops(n, heads, d)
    if isinstance(attn, LinearAttention):
        return linear_attention_flops(n, heads, d, feature_ops=2 if attn.feature_map_name == "elu" else 1)
    return None
