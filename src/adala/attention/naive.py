"""Float64 references that build the N×N matrix explicitly. Tests only: O(N²) memory on purpose."""

from __future__ import annotations

import torch


def linear_attention_reference(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Row-normalised kernel attention: A = φq φkᵀ; out = A v / (A·1 + eps), all in float64."""
    q, k, vv = phi_q.double(), phi_k.double(), v.double()
    a = torch.einsum("bhnd,bhmd->bhnm", q, k)
    return torch.einsum("bhnm,bhme->bhne", a, vv) / (a.sum(-1, keepdim=True) + eps)


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    a = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * scale, dim=-1)
    return torch.einsum("bhnm,bhme->bhne", a, v.double())
