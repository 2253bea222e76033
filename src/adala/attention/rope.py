"""Attention kinds for timm's ``Eva`` family (DINOv3, PE-Core, EVA-02): rotary position embeddings, then φ.

Built from an ``EvaAttention`` or ``timm.layers.AttentionRope``, taking over fused ``qkv`` (with EVA's
separate ``q_bias``/``v_bias`` and zero ``k_bias``) or ``q_proj``/``k_proj``/``v_proj``, ``q_norm``/``k_norm``,
the sub-LN ``norm`` before ``proj``, an optional ``gate``, and grouped-query K/V heads, all by reference:
state-dict keys and tensors stay the teacher's. RoPE is applied exactly as the softmax block does — to q and
k after the prefix tokens, in the model's interleaved or rotate-half layout — then the feature map.

What RoPE means for a kernel feature map. Softmax sees q and k only through (R_i q)·(R_j k) = q·R_{j−i} k:
between patch tokens its position dependence is purely relative, so shifting every rope position by the
same offset leaves softmax attention unchanged (prefix tokens carry no rotation, so pairs with them are
not shift-invariant even for softmax). A kernel feature map applied *after* the rotation, φ(R_i q)·φ(R_j k),
has no such identity (φ does not commute with rotations): the student is position-aware, but in absolute,
not relative, terms. Measured in ``tests/test_eva.py`` on float64 references (12 patch tokens, head dim 32,
random weights and inputs): a shift of 5 positions leaves softmax unchanged to 1e-10 and moves ELU+1 linear
attention's output by 3.5 % (rotate-half layout, DINOv3) and 4.1 % (interleaved, EVA-02) relative norm;
the module reproduces its reference before and after the shift. Stage 1 then fits q/k projections under this
kernel; applying φ before the rotation instead would lose positivity of φq·φk (rotated features go negative).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from ..errors import UnsupportedModelError
from .base import KernelAttention, check_option_names
from .flops import kind_flops
from .ops import DEFAULT_EPS, FEATURE_MAPS, linear_attention

ROPE_KINDS = {"softmax": None, "linear-elu": "elu", "linear-relu": "relu"}


class RopeKernelAttention(KernelAttention):
    """Eva/AttentionRope attention with the softmax replaced by a kernel (or kept, for kind ``softmax``)."""

    def __init__(self, attn: nn.Module, kind: str = "linear-elu", eps: float = DEFAULT_EPS,
                 kernel: str = "auto", **options: Any) -> None:
        check_option_names(type(self), options, kind)
        if kind not in ROPE_KINDS:
            raise UnsupportedModelError(
                f"attention kind {kind!r} has no rotary-embedding version; Eva models take {', '.join(ROPE_KINDS)}")
        nn.Module.__init__(self)
        self.kind = kind
        self.feature_map_name = ROPE_KINDS[kind]
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.num_kv_heads = int(getattr(attn, "num_kv_heads", self.num_heads))
        self.scale = getattr(attn, "scale", self.head_dim**-0.5)
        self.num_prefix_tokens = int(getattr(attn, "num_prefix_tokens", 0))
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self.qkv_bias_separate = bool(getattr(attn, "qkv_bias_separate", False))
        self.qkv = attn.qkv
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.q_bias = getattr(attn, "q_bias", None)
        self.v_bias = getattr(attn, "v_bias", None)
        k_bias = getattr(attn, "k_bias", None)
        if k_bias is not None:
            self.register_buffer("k_bias", k_bias, persistent=False)  # EVA's zero k bias is not saved
        else:
            self.k_bias = None
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.gate = getattr(attn, "gate", None)
        self.attn_drop = getattr(attn, "attn_drop", nn.Dropout(0.0))
        self.fused = bool(getattr(attn, "fused_attn", True))
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self.eps = float(eps)
        self.feature_map = FEATURE_MAPS[self.feature_map_name] if self.feature_map_name else None
        self.options = {"eps": eps, "kernel": kernel} if self.feature_map else {}

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(b, n, self.num_kv_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(b, n, self.num_kv_heads, -1).transpose(1, 2)
        return self.q_norm(q), self.k_norm(k), v

    def rotate(self, t: torch.Tensor, rope: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """RoPE on the patch tokens (prefix tokens carry no position), as the softmax block applies it."""
        if rope is None:
            return t
        p = self.num_prefix_tokens
        return torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope, half=self.rotate_half)],
                         dim=2).type_as(like)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.feature_map is None:
            if self.fused:
                p = self.attn_drop.p if self.training else 0.0
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            return self.attn_drop(attn) @ v
        return linear_attention(self.feature_map(q), self.feature_map(k), v, self.eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, **_: Any) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{self.kind} attention is non-causal and takes no attn_mask")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv_heads(x)
        q, k = self.rotate(q, rope, v), self.rotate(k, rope, v)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = self.norm(self.mix(q, k, v).transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def flops(self, n: int) -> dict[str, int]:
        """Mixing FLOPs at ``n`` tokens (the FLOP counter's convention; RoPE, like softmax's exp, uncounted)."""
        return kind_flops(n, self.num_heads, self.head_dim, None if self.feature_map is None else self.feature_map_name)
