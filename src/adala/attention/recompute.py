"""Linear attention for training that keeps only q, k, v for the backward and recomputes the rest.

out = φq (φkᵀ v) / (φq · Σφk + eps), φ = ELU+1 or ReLU, non-causal. Plain autograd over ``ops.linear_attention``
keeps φq, φk, the stacked d×(d+1) state and the N×(d+1) product for every block, on top of q, k, v, and its
backward walks several more N×d temporaries; at 672² that put a student's training step above its softmax
teacher's (whose SDPA backward keeps only q, k, v, the output and a per-row log-sum-exp). Here autograd saves
the pre-φ q, k, v (views of the qkv projection, which it keeps anyway) and nothing else: the backward
recomputes φ, the d×d state and Σφk per image, one (H, N, D) slab at a time.

Backward, per head, with S = φkᵀv, z = Σφk, den = φq·z + eps and g = ∂L/∂out (out itself is never needed):

    G = g Sᵀ,  t = (φq·G)/den,  ∂φq = (G − t zᵀ)/den,  ∂S = φqᵀ (g/den),  ∂z = −φqᵀ (t/den),
    ∂v = φk ∂S,  ∂φk = v ∂Sᵀ + 1 ∂zᵀ,  ∂q = ∂φq ⊙ φ'(q),  ∂k = ∂φk ⊙ φ'(k),

with φ'(x) = min(φ(x), 1) for ELU+1 and [φ(x) > 0] for ReLU, so the derivative comes from the recomputed φ.
Cost: the four backward products (2× the forward's two, as any matmul's backward) plus one recomputed S,
i.e. one more N·d² product per head than plain autograd; under 1 % of a ViT-S/14 training step.

Sums, state and normaliser are fp32 under bf16/fp16 (inputs are upcast per image inside the call, autocast
off); the output and the gradients come back in the inputs' dtype. Two entry points:

- ``linear_attention_recompute(q, k, v)``: (B, H, N, D) tensors, what ``LinearAttention.mix`` uses.
- ``packed_linear_attention_recompute(qkv, ...)``: straight from the packed (B, N, 3·H·D) projection, returns
  (B, N, H·D) and hands back one packed gradient, so neither the output reshape nor unbind's stack of
  dq|dk|dv (plus the permute's reshape copy) is ever made; what ``LinearAttention.forward`` uses in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import DEFAULT_EPS

FEATURE_MAP_NAMES = ("elu", "relu")
# below this many tokens the batch runs as whole 4-D products (per-image calls cost more than the copies)
BATCHED_BELOW_TOKENS = 512


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _phi(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ(x) as a new tensor (``x`` may be a view of the caller's projection: never written)."""
    if name == "elu":
        return F.elu(x).add_(1.0)
    return F.relu(x)


def _phi_grad_(phi: torch.Tensor, name: str) -> torch.Tensor:
    """φ'(x) from φ(x), in place: ELU+1 is x+1 (slope 1) above 0 and exp(x) = φ below; ReLU's slope is 1 where φ>0."""
    if name == "elu":
        return phi.clamp_(max=1.0)
    return phi.gt_(0.0)


def _groups(b: int, n: int) -> list[slice]:
    """Images processed together: all at once for short sequences, else one at a time."""
    return [slice(0, b)] if n < BATCHED_BELOW_TOKENS else [slice(i, i + 1) for i in range(b)]


def _phis(q: torch.Tensor, k: torch.Tensor, s: slice, name: str, qk: torch.Tensor | None,
          acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """φq, φk of images ``s`` as (., H, N, D), and the one tensor holding both when ``qk`` is given.

    ``qk`` is the (B, N, 2, H, D) q|k part of a packed projection: one φ over its rows of 2·H·D contiguous values
    runs at twice the rate of two calls over 64-wide head views (CPU, ELU), and leaves φ' one call too."""
    if qk is None:
        return _phi(q[s].to(acc), name), _phi(k[s].to(acc), name), None
    both = _phi(qk[s].to(acc), name)  # (., N, 2, H, D), dense
    return both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2), both


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, name: str, eps: float,
             qk: torch.Tensor | None = None) -> None:
    """(B, H, N, D) views -> ``out`` (B, H, N, Dv) view, any strides; ``qk`` as in ``_phis``."""
    acc = _acc_dtype(v.dtype)
    for s in _groups(q.shape[0], q.shape[2]):
        phq, phk, _ = _phis(q, k, s, name, qk, acc)
        state = phk.transpose(-2, -1) @ v[s].to(acc)  # (., H, D, Dv)
        den = (phq @ phk.sum(-2).unsqueeze(-1)).add_(eps)  # (., H, N, 1)
        del phk
        torch.div(phq @ state, den, out=out[s])  # strided write; casts back to a bf16/fp16 ``out``


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, dq: torch.Tensor,
              dk: torch.Tensor, dv: torch.Tensor, name: str, eps: float, out: torch.Tensor | None = None,
              qk: torch.Tensor | None = None) -> None:
    """Gradients of ``_forward`` for output gradient ``g``, written into the views ``dq``, ``dk``, ``dv``; with
    ``out`` also the forward's output, from the φ, state and normaliser the backward recomputes anyway (one more
    N·d² product, where a separate ``_forward`` would redo φ, the state and the normaliser as well); ``qk`` as in
    ``_phis``."""
    acc = _acc_dtype(v.dtype)
    for s in _groups(q.shape[0], q.shape[2]):
        phq, phk, both = _phis(q, k, s, name, qk, acc)
        vs, gs = v[s].to(acc), g[s].to(acc)
        state = phk.transpose(-2, -1) @ vs  # S (., H, D, Dv)
        z = phk.sum(-2).unsqueeze(-2)  # (., H, 1, D)
        rden = (phq @ z.transpose(-2, -1)).add_(eps).reciprocal_()  # 1/den (., H, N, 1)
        if out is not None:
            torch.mul(phq @ state, rden, out=out[s])
        grad = gs @ state.transpose(-2, -1)  # G (., H, N, D)
        del state
        t = (phq * grad).sum(-1, keepdim=True).mul_(rden)  # (φq·G)/den (., H, N, 1)
        d_state = phq.transpose(-2, -1) @ (gs * rden)  # ∂S (., H, D, Dv)
        d_z = (phq.transpose(-2, -1) @ (t * rden)).neg_().transpose(-2, -1)  # ∂z (., H, 1, D)
        grad.sub_(t * z).mul_(rden)  # ∂φq
        del t, rden
        dv[s].copy_(phk @ d_state)
        d_phk = (vs @ d_state.transpose(-2, -1)).add_(d_z)  # ∂φk
        if both is None:
            _phi_grad_(phq, name)
            _phi_grad_(phk, name)
        else:
            _phi_grad_(both, name)  # φ' of q and k in one call
        torch.mul(grad, phq, out=dq[s])
        torch.mul(d_phk, phk, out=dk[s])


def _check(name: str) -> None:
    if name not in FEATURE_MAP_NAMES:
        raise ValueError(f"feature map must be one of {', '.join(FEATURE_MAP_NAMES)}, got {name!r}")


class _LinearAttention(torch.autograd.Function):
    """(B, H, N, D) q, k, v -> (B, H, N, Dv) output laid out as (B, N, H, Dv) memory (its token reshape is a view)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.name, ctx.eps = name, eps
        b, h, n, _ = q.shape
        with torch.autocast(device_type=v.device.type, enabled=False):
            out = v.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)
            _forward(q, k, v, out, name, eps)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, k, v = ctx.saved_tensors
        b, h, n, d = q.shape
        m, dv_ = k.shape[2], v.shape[-1]
        with torch.autocast(device_type=v.device.type, enabled=False):
            dq = q.new_empty(b, n, h, d).transpose(1, 2)
            dk = k.new_empty(b, m, h, d).transpose(1, 2)
            dv = v.new_empty(b, m, h, dv_).transpose(1, 2)
            _backward(q, k, v, g, dq, dk, dv, ctx.name, ctx.eps)
        return dq, dk, dv, None, None


class _PackedLinearAttention(torch.autograd.Function):
    """Packed (B, N, 3·H·D) projection -> (B, N, H·D), or with ``weight`` the output projection's (B, N, C):
    then the attention output is recomputed in the backward for the projection's weight gradient instead of
    being kept (by ``nn.Linear``) for it. The gradient comes back packed like the projection."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_heads: int,
                head_dim: int, name: str, eps: float) -> torch.Tensor:
        ctx.heads, ctx.head_dim, ctx.name, ctx.eps = num_heads, head_dim, name, eps
        ctx.has_bias = bias is not None
        ctx.save_for_backward(qkv, weight)
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            out = _attend(qkv, num_heads, head_dim, name, eps)
            if weight is None:
                return out
            # autocast's rule for the projection: the weights in the activations' dtype
            return F.linear(out, weight.to(out.dtype), None if bias is None else bias.to(out.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        qkv, weight = ctx.saved_tensors
        b, n, _ = qkv.shape
        h, d = ctx.heads, ctx.head_dim
        d_weight = d_bias = None
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            g_out = g
            out = None
            if weight is not None:
                g_out = g.to(qkv.dtype)
                if ctx.needs_input_grad[1]:  # recomputed inside the backward below: autograd never kept it
                    out = qkv.new_empty(b, n, h * d)
                if ctx.needs_input_grad[0]:
                    g = g_out @ weight.to(g_out.dtype)  # (B, N, H·D): the gradient at the attention output
            out_heads = None if out is None else out.view(b, n, h, d).transpose(1, 2)
            grad = None
            if ctx.needs_input_grad[0]:
                grad = torch.empty_like(qkv, memory_format=torch.contiguous_format)
                _backward(*_split(qkv, h, d), g.view(b, n, h, d).transpose(1, 2), *_split(grad, h, d), ctx.name,
                          ctx.eps, out_heads, _qk(qkv, h, d))
            elif out_heads is not None:
                _forward(*_split(qkv, h, d), out_heads, ctx.name, ctx.eps, _qk(qkv, h, d))
            if out is not None:
                d_weight = (g_out.reshape(-1, g_out.shape[-1]).t() @ out.view(-1, h * d)).to(weight.dtype)
            if weight is not None and ctx.has_bias and ctx.needs_input_grad[2]:
                d_bias = g_out.sum((0, 1)).to(weight.dtype)
        return grad, d_weight, d_bias, None, None, None, None


def _attend(qkv: torch.Tensor, num_heads: int, head_dim: int, name: str, eps: float) -> torch.Tensor:
    """The attention output (B, N, H·D) of a packed projection, no autograd."""
    b, n, _ = qkv.shape
    out = qkv.new_empty(b, n, num_heads * head_dim)
    _forward(*_split(qkv, num_heads, head_dim), out.view(b, n, num_heads, head_dim).transpose(1, 2), name, eps,
             _qk(qkv, num_heads, head_dim))
    return out


def _qk(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """The (B, N, 2, H, D) q|k part of a packed (B, N, 3·H·D) projection, a view."""
    return qkv[..., : 2 * num_heads * head_dim].unflatten(-1, (2, num_heads, head_dim))


def _split(qkv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3·H·D) -> q, k, v as (B, H, N, D) strided views (timm's qkv layout: [q | k | v], heads inside)."""
    b, n, _ = qkv.shape
    t = qkv.view(b, n, 3, num_heads, head_dim) if qkv.is_contiguous() else qkv.reshape(b, n, 3, num_heads, head_dim)
    return t[:, :, 0].transpose(1, 2), t[:, :, 1].transpose(1, 2), t[:, :, 2].transpose(1, 2)


def linear_attention_recompute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str = "elu",
                               eps: float = DEFAULT_EPS) -> torch.Tensor:
    """out = φq (φkᵀ v) / (φq·Σφk + eps) for pre-φ (B, H, N, D) q, k and (B, H, M, Dv) v; autograd saves q, k, v
    only. Returns (B, H, N, Dv) in the inputs' dtype, a view of (B, N, H, Dv) memory."""
    _check(feature_map)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return _LinearAttention.apply(q, k, v, feature_map, float(eps))


def packed_linear_attention_recompute(qkv: torch.Tensor, num_heads: int, head_dim: int, feature_map: str = "elu",
                                      eps: float = DEFAULT_EPS, proj_weight: torch.Tensor | None = None,
                                      proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same from the packed qkv projection (B, N, 3·H·D) -> (B, N, H·D); autograd saves ``qkv`` only.

    With ``proj_weight`` (C, H·D) (and ``proj_bias``) returns the output projection of that, (B, N, C), and
    autograd saves ``qkv`` and the weight only: the attention output is recomputed in the backward (one more
    N·d² product per head) rather than kept for the weight's gradient, which is what puts a linear block's
    training memory below a softmax block's (SDPA keeps its output for ``proj``)."""
    _check(feature_map)
    if qkv.dim() != 3 or qkv.shape[-1] != 3 * num_heads * head_dim:
        raise ValueError(f"qkv must be (B, N, 3·{num_heads}·{head_dim}), got {tuple(qkv.shape)}")
    if proj_weight is not None and proj_weight.shape[-1] != num_heads * head_dim:
        raise ValueError(f"proj_weight takes {proj_weight.shape[-1]} features, expected {num_heads * head_dim}")
    return _PackedLinearAttention.apply(qkv, proj_weight, proj_bias, num_heads, head_dim, feature_map, float(eps))
