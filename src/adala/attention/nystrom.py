"""``nystrom``: Nyströmformer (Xiong et al. 2021) — softmax attention approximated through m landmarks.

Landmarks q̃, k̃ are segment means of q and k over m contiguous segments (uneven lengths when m does not divide
N: segment i is tokens ⌊iN/m⌋..⌊(i+1)N/m⌋). With F = softmax(s·Q K̃ᵀ) (N×m), A = softmax(s·Q̃ K̃ᵀ) (m×m) and
B = softmax(s·Q̃ Kᵀ) (m×N):  out = F · A⁺ · (B V), O(N·m·D). A⁺ is the paper's iterative Moore–Penrose
inverse (``pinv_iterations``, 6 as in the paper; 0 = ``torch.linalg.pinv``). N ≤ m falls back to exact softmax,
which then costs no more than the landmarks would. Everything runs in fp32 under autocast: A is inverted.
No learnable parameters: the swap uses only the teacher's weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import KernelAttention
from .registry import register


def segment_means(n: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(m, N) averaging matrix of m contiguous, near-equal segments (each non-empty since m ≤ N)."""
    bounds = torch.tensor([((i + 1) * n) // m for i in range(m)], device=device)
    seg_id = torch.bucketize(torch.arange(n, device=device), bounds, right=True)  # token -> its segment
    onehot = F.one_hot(seg_id, m).to(dtype).transpose(0, 1)
    return onehot / onehot.sum(1, keepdim=True)


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore–Penrose inverse of (…, m, m) matrices by the Nyströmformer's cubic iteration.

    Z₀ = Aᵀ / (‖A‖₁‖A‖∞) per matrix; Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    norm_inf = a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-2, -1) / (norm1 * norm_inf)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register("nystrom")
class NystromAttention(KernelAttention):
    def __init__(self, attn: nn.Module, landmarks: int = 32, pinv_iterations: int = 6, **options: Any) -> None:
        super().__init__(attn, landmarks=landmarks, pinv_iterations=pinv_iterations, **options)
        if int(landmarks) < 1:
            raise ConfigError(f"nystrom landmarks must be >= 1, got {landmarks}")
        if int(pinv_iterations) < 0:
            raise ConfigError(f"nystrom pinv_iterations must be >= 0, got {pinv_iterations}")
        self.landmarks = int(landmarks)
        self.pinv_iterations = int(pinv_iterations)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, m = q.shape[2], self.landmarks
        out_dtype = v.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            q, k, v = q.to(acc) * float(self.scale), k.to(acc), v.to(acc)
            if n <= m:
                return F.scaled_dot_product_attention(q, k, v, scale=1.0).to(out_dtype)
            seg = segment_means(n, m, acc, q.device)
            q_l, k_l = seg @ q, seg @ k  # (B,H,m,D); q already carries the scale
            f = torch.softmax(q @ k_l.transpose(-2, -1), dim=-1)  # (B,H,N,m)
            a = torch.softmax(q_l @ k_l.transpose(-2, -1), dim=-1)  # (B,H,m,m)
            bv = torch.softmax(q_l @ k.transpose(-2, -1), dim=-1) @ v  # (B,H,m,Dv)
            a_inv = iterative_pinv(a, self.pinv_iterations) if self.pinv_iterations else torch.linalg.pinv(a)
            out = f @ (a_inv @ bv)
        return out.to(out_dtype)
