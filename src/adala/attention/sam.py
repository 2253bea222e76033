"""Attention kinds for the SAM image encoder (timm ``VisionTransformerSAM``): (B, H, W, C) in and out,
decomposed relative position bias handled explicitly.

SAM adds a bias b_ij = q_i·Rh[r_i − r_j] + q_i·Rw[c_i − c_j] to the softmax logits. A kernel attention
A_ij = φ(q_i)·φ(k_j) cannot add it without building the N×N matrix, so ``rel_pos`` chooses:

* ``"drop"``: ignore the bias (warned once): the student must learn positions from q/k alone;
* ``"approx"``: the best additive-separable approximation b_ij ≈ u_i + w_j (least squares: w_j the bias's
  mean over queries). The query part u_i cancels in the row normalisation (as it does in softmax), so what
  is left is a key weight e^{w_j} on φ(k_j) in both numerator and normaliser, computed exactly in
  O((H² + W²)·D) per head from row/column sums of q: linear cost kept, the bias's key-position preference kept.

README "SAM, Eva" reports which gives the lower stage-1 error. The tables ``rel_pos_h``/``rel_pos_w`` stay in
the module (same state-dict keys) either way, so the student can always go back to exact softmax.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias, get_rel_pos
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .base import KernelAttention, check_option_names
from .flops import kind_flops
from .ops import DEFAULT_EPS, FEATURE_MAPS, linear_attention

SAM_KINDS = {"softmax": None, "linear-elu": "elu", "linear-relu": "relu"}
REL_POS = ("approx", "drop")
DEFAULT_REL_POS = "approx"


def key_weights_from_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                             hw: tuple[int, int]) -> torch.Tensor:
    """w_j = mean_i b_ij for SAM's decomposed bias, from q (B, heads, N, D): (B, heads, N), in O(H²+W²)."""
    h, w = hw
    b, nh, n, d = q.shape
    grid = q.reshape(b, nh, h, w, d)
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (H_q, H_k, D): rh[r_i, r_j] = R[r_i − r_j + H − 1]
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    wh = torch.einsum("bnrd,rsd->bns", grid.sum(3), rh)  # Σ_i q_i·Rh[r_i, r_j] for each key row r_j
    ww = torch.einsum("bncd,csd->bns", grid.sum(2), rw)
    return ((wh[..., :, None] + ww[..., None, :]) / n).reshape(b, nh, n)


class SamKernelAttention(KernelAttention):
    """SAM's attention with the softmax replaced by a kernel (or kept exactly, for kind ``softmax``)."""

    def __init__(self, attn: nn.Module, kind: str = "linear-elu", eps: float = DEFAULT_EPS,
                 rel_pos: str = DEFAULT_REL_POS, kernel: str = "auto", **options: Any) -> None:
        check_option_names(type(self), options, kind)
        if kind not in SAM_KINDS:
            raise UnsupportedModelError(
                f"attention kind {kind!r} has no SAM version; SAM models take {', '.join(SAM_KINDS)}")
        if rel_pos not in REL_POS:
            raise ConfigError(f"rel_pos must be one of {', '.join(REL_POS)}, got {rel_pos!r}")
        super().__init__(attn)
        self.kind = kind
        self.feature_map_name = SAM_KINDS[kind]
        self.feature_map = FEATURE_MAPS[self.feature_map_name] if self.feature_map_name else None
        self.eps = float(eps)
        self.use_rel_pos = bool(getattr(attn, "use_rel_pos", False))
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        self.rope = getattr(attn, "rope", None)
        self.attn_drop = getattr(attn, "attn_drop", nn.Dropout(0.0))
        self.fused = bool(getattr(attn, "fused_attn", True))
        self.rel_pos = rel_pos
        self.options = {"eps": eps, "rel_pos": rel_pos, "kernel": kernel} if self.feature_map else {}
        if self.feature_map and self.use_rel_pos and rel_pos == "drop":
            warnings.warn("SAM relative position bias dropped in linearized blocks (rel_pos='drop'); "
                          "rel_pos='approx' keeps its key-side part", stacklevel=3)

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        b, h, w, _c = x.shape
        n = h * w
        q, k, v = self.qkv_heads(x.reshape(b, n, -1))  # (B, heads, N, D)
        if not self.use_rel_pos and self.rope is not None:
            rope = self.rope.get_embed()
            q, k = apply_rot_embed_cat(q, rope).type_as(v), apply_rot_embed_cat(k, rope).type_as(v)
        out = self.softmax_mix(q, k, v, (h, w)) if self.feature_map is None else self.kernel_mix(q, k, v, (h, w))
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out)).view(b, h, w, -1)

    def softmax_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """timm's SAM softmax, op for op (bias from (B·heads, N, D) queries)."""
        b, nh, n, d = q.shape
        q, k, v = q.reshape(b * nh, n, d), k.reshape(b * nh, n, d), v.reshape(b * nh, n, d)
        bias = get_decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, hw, hw) if self.use_rel_pos else None
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            a = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                a = a + bias
            out = self.attn_drop(a.softmax(dim=-1)) @ v
        return out.view(b, nh, n, -1)

    def kernel_mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        phi_q, phi_k = self.feature_map(q), self.feature_map(k)
        if self.use_rel_pos and self.rel_pos == "approx":
            wj = key_weights_from_rel_pos(q, self.rel_pos_h, self.rel_pos_w, hw)
            phi_k = phi_k * torch.exp(wj - wj.amax(-1, keepdim=True)).unsqueeze(-1)
        return linear_attention(phi_q, phi_k, v, self.eps)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("SAM attention mixes on its (H, W) grid: call forward")

    def flops(self, n: int) -> dict[str, int]:
        return kind_flops(n, self.num_heads, self.head_dim, None if self.feature_map is None else self.feature_map_name)
