"""Non-causal linear-attention math: O(N·d²) time, O(N·d + d²) memory, never an N×N matrix.

Sums and normaliser are accumulated in fp32 even under bf16/fp16 autocast, because a sum over
thousands of tokens in half precision loses the small terms and the normaliser can underflow.

Two entry points with the same math, out = φq (φkᵀ v) / (φq · Σφk + eps):

- ``linear_attention(phi_q, phi_k, v)``: any dtype, autocast, autograd; what every kind's ``mix`` uses.
- ``fused_linear_attention(qkv, ...)``: no-grad inference straight from the packed qkv projection.
  It applies φ in place on the projection, reads q/k/v through strided views (no permute copies),
  and writes the result in the (B, N, H·D) layout the output projection wants, so the only passes
  over memory besides the two small matmuls are φ and the division. ``packed_projection`` computes
  that projection into a reusable per-thread CPU workspace: at high resolution it is larger than
  glibc's mmap threshold (32 MiB), so a fresh tensor costs one page fault per 4 KiB on every call.

With autograd the normaliser rides with the numerator: Σφk is stacked as one extra column next to
φkᵀv (a d×(d+1) matrix), so φq·[φkᵀv | Σφk] yields both in one matmul and one backward node.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import freed_memory_kept
from ..tracing import is_tracing

DEFAULT_EPS = 1e-6

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = ELU(x) + 1: positive everywhere, the paper's default."""
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


# Up to this many elements ELU+1 runs as exp(min(x, 0)) + max(x, 0): torch's exp kernel is ~1.5x faster
# than its expm1-based ELU, which pays off while the extra passes stay in cache (1.4 ms of 105 ms per
# ViT-S/14 forward at 224² on 2 cores); beyond it the passes over memory cost more than exp saves.
EXP_PATH_MAX_NUMEL = 1 << 20


def elu_plus_one_(x: torch.Tensor) -> torch.Tensor:
    """ELU(x)+1 in place (the caller owns ``x``)."""
    if x.numel() <= EXP_PATH_MAX_NUMEL:
        neg = torch.clamp(x, max=0.0).exp_()
        return x.clamp_(min=0.0).add_(neg)
    return F.elu_(x).add_(1.0)


def relu_(x: torch.Tensor) -> torch.Tensor:
    return F.relu_(x)


FEATURE_MAPS: dict[str, FeatureMap] = {"elu": elu_plus_one, "relu": relu}
FEATURE_MAPS_INPLACE: dict[str, FeatureMap] = {"elu": elu_plus_one_, "relu": relu_}


def _elu_plus_one_one_pass_(x: torch.Tensor) -> None:
    # ELU(x)+1 is x+1 above 0 and exp(x) below: one fused pass once compiled (eager ELU is an
    # expm1 pass plus an add pass), and exp(x) is at least as accurate as expm1(x)+1.
    x.copy_(torch.where(x > 0, x + 1.0, torch.exp(x)))


_COMPILE = {"enabled": os.environ.get("ADALA_COMPILE_FEATURE_MAPS", "") not in ("", "0"), "fns": {}}


def set_compiled_feature_maps(enabled: bool) -> bool:
    """Run the fused path's ELU+1 through ``torch.compile`` (one pass instead of two; about 2x
    faster on CPU). Off by default: the first call compiles C++ (tens of seconds on a small CPU).
    Also set by the environment variable ``ADALA_COMPILE_FEATURE_MAPS=1``. Returns the old value."""
    old = _COMPILE["enabled"]
    _COMPILE["enabled"] = bool(enabled)
    return old


def _apply_inplace_feature_map(name: str, x: torch.Tensor) -> None:
    if _COMPILE["enabled"] and name == "elu":
        fn = _COMPILE["fns"].get(name)
        if fn is None:
            fn = _COMPILE["fns"][name] = torch.compile(_elu_plus_one_one_pass_, dynamic=True)
        try:
            fn(x)
            return
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported backend...: eager is exact too

            logging.getLogger(__name__).warning("compiled feature map unavailable (%s); using eager", e)
            _COMPILE["enabled"] = False
    FEATURE_MAPS_INPLACE[name](x)


def apply_feature_map_(name: str, x: torch.Tensor) -> None:
    """φ (``FEATURE_MAPS[name]``) in place on ``x``, the way the fused paths apply it (compiled when
    ``set_compiled_feature_maps`` is on); for callers outside this module that own ``x``."""
    _apply_inplace_feature_map(name, x)


_WORKSPACE = threading.local()


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer of at least ``numel`` elements, reused across calls by this thread.

    Only for data consumed before the next call (the packed qkv projection). Kept apart per
    inference mode, since inference tensors cannot be written outside inference mode.
    """
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    key = (dtype, torch.device(device), torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs.pop(key, None)  # free the old one before allocating the larger one
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def clear_workspace() -> None:
    """Release this thread's scratch buffers (they hold the largest projection, or for streamed blocks
    one image's φ(q), seen so far); the next forward allocates them again."""
    _WORKSPACE.bufs = {}


def workspace_bytes() -> int:
    """Bytes this thread's scratch buffers hold between calls (what :func:`clear_workspace` frees)."""
    bufs = getattr(_WORKSPACE, "bufs", None) or {}
    return sum(b.numel() * b.element_size() for b in bufs.values())


def packed_projection(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(x)`` for (B, N, C) ``x`` without autograd; on CPU written into the workspace.

    The result is only valid until this thread's next call: it is meant for
    ``fused_linear_attention``, which consumes it in place.
    """
    if x.device.type != "cpu" or freed_memory_kept():
        # the allocator reuses freed blocks already: a fresh tensor is as cheap and, unlike the
        # workspace, is released before the MLP, so it adds nothing to the peak
        return F.linear(x, linear.weight, linear.bias)
    b, n, c = x.shape
    out = workspace(b * n * linear.out_features, x.dtype, x.device).view(b * n, linear.out_features)
    x2 = x.reshape(b * n, c)
    if linear.bias is None:
        torch.mm(x2, linear.weight.t(), out=out)
    else:
        torch.addmm(linear.bias, x2, linear.weight.t(), out=out)
    return out.view(b, n, linear.out_features)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kv_with_sum(phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[φkᵀv | Σφk]: (…, D, Dv+1), the whole state linear attention keeps about the keys."""
    kt = phi_k.transpose(-2, -1)
    kv = torch.bmm(kt, v) if kt.dim() == 3 else kt @ v  # bmm takes strided views as they are
    return torch.cat([kv, phi_k.sum(-2).unsqueeze(-1)], dim=-1)


def _mix_no_grad(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, num: torch.Tensor, den: torch.Tensor,
    eps: float,
) -> None:
    """One image: q (H, N, D), k (H, M, D), v (H, M, Dv) views of any strides -> ``out`` (H, N, Dv).

    ``num`` (H, N, Dv) and ``den`` (H, N) are contiguous scratch. The numerator matmul is kept at
    Dv columns (a 65th normaliser column costs BLAS ~50 % more at D=64 on CPU); the normaliser is
    one matrix-vector product per head instead, and the division writes ``out`` in whatever layout
    it has, so a transposed view of the (N, H, Dv) result costs no extra pass.
    """
    kv = torch.bmm(k.transpose(1, 2), v)  # (H, D, Dv)
    ksum = token_sum(k)  # (H, D)
    torch.bmm(q, kv, out=num)
    normaliser(q, ksum, den, per_head=q.device.type == "cpu")
    torch.div(num, den.add_(eps).unsqueeze(-1), out=out)


def token_sum(k: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of k (H, N, D) -> (H, D). On CPU one BLAS gemv per head: a strided reduction
    over N is as fast on one thread but with two it can stall a scheduler tick (4 ms) per call when
    the second core is busy, where BLAS keeps small products on one thread."""
    if k.device.type != "cpu":
        return k.sum(1)
    h, n, d = k.shape
    ones = k.new_ones(n)
    if k.stride(2) == 1 and k.stride(0) == d:  # heads side by side in a token row: one (N, H·D) gemv
        rows = k.as_strided((n, h * d), (k.stride(1), 1))
        return torch.mv(rows.t(), ones).view(h, d)
    return torch.stack([torch.mv(k[i].t(), ones) for i in range(h)])


# Below this many tokens the CPU normaliser is one multiply and one reduction over q instead of a gemv per
# head: at 257 tokens the six gemvs and their indexing cost 70 µs against 37 µs; at thousands of tokens the
# (H, N, D) temporary the product needs costs more than the per-head calls.
NORMALISER_PRODUCT_BELOW_TOKENS = 512


def normaliser(q: torch.Tensor, ksum: torch.Tensor, den: torch.Tensor, per_head: bool) -> None:
    """den[h] = q[h] · ksum[h] for q (H, N, D). On CPU (``per_head``) one multiply and one reduction below
    NORMALISER_PRODUCT_BELOW_TOKENS, else one BLAS gemv per head (a batched (N, D)x(D, 1) bmm is several
    times slower there); one bmm on GPUs (one launch)."""
    if per_head and q.shape[1] < NORMALISER_PRODUCT_BELOW_TOKENS:
        torch.sum(q * ksum.unsqueeze(1), dim=-1, out=den)
    elif per_head:
        for h in range(q.shape[0]):
            torch.mv(q[h], ksum[h], out=den[h])
    else:
        torch.bmm(q, ksum.unsqueeze(-1), out=den.unsqueeze(-1))


# Below this many tokens a batch runs as whole-batch 4-D products: the per-image loop of strided BLAS
# calls is then dominated by per-call overhead (at 37 tokens and batch 64 it made the student slower
# than softmax), while the copies matmul makes of the small strided views cost little.
BATCHED_BELOW_TOKENS = 512


def linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """out = φq (φkᵀ v) / (φq · Σφk + eps) for already-mapped features.

    Shapes: phi_q (B, H, N, D), phi_k (B, H, M, D), v (B, H, M, Dv) -> (B, H, N, Dv).
    Without autograd the result is written straight into (B, N, H, Dv) memory and returned as its
    (B, H, N, Dv) view, so the caller's ``transpose(1, 2).reshape`` is free instead of a copy.
    Under a tracer/exporter/compiler (``adala.tracing.is_tracing``) the functional formulation runs
    instead: the no-grad path's ``out=`` writes into views of a fresh buffer are lost by the ONNX
    exporter, which then bakes that buffer in as a constant.
    """
    out_dtype = v.dtype
    with torch.autocast(device_type=v.device.type, enabled=False):
        acc = _acc_dtype(v.dtype)
        phi_q, phi_k, v = phi_q.to(acc), phi_k.to(acc), v.to(acc)
        dv = v.shape[-1]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (phi_q, phi_k, v))
        if needs_grad or phi_q.dim() != 4 or is_tracing():
            nd = phi_q @ _kv_with_sum(phi_k, v)  # (…, N, Dv+1): numerator and normaliser together
            out = nd[..., :dv] / (nd[..., dv:] + eps)
        else:
            out = _mix_into_tokens(phi_q, phi_k, v, eps).transpose(1, 2)
    return out.to(out_dtype)


def _mix_into_tokens(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """No-grad products for (B, H, N, D) views of one float dtype -> (B, N, H, Dv) contiguous memory."""
    b, h, n, _ = phi_q.shape
    dv = v.shape[-1]
    mem = v.new_empty(b, n, h, dv)
    if b > 1 and n < BATCHED_BELOW_TOKENS:  # whole-batch products; the division writes (B, N, H, Dv)
        kv = torch.matmul(phi_k.transpose(-2, -1), v)  # (B, H, D, Dv)
        den = torch.matmul(phi_q, phi_k.sum(-2).unsqueeze(-1))  # (B, H, N, 1)
        torch.div(torch.matmul(phi_q, kv), den.add_(eps), out=mem.transpose(1, 2))
    else:
        num = v.new_empty(h, n, dv)
        den = v.new_empty(h, n)
        for i in range(b):  # 3-D products on strided views: no reshape copies of q, k, v
            _mix_no_grad(phi_q[i], phi_k[i], v[i], mem[i].transpose(0, 1), num, den, eps)
    return mem


def fused_linear_attention(
    qkv: torch.Tensor, num_heads: int, head_dim: int, feature_map: str = "elu", eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Inference linear attention from the packed projection ``qkv`` (B, N, 3·H·D) -> (B, N, H·D).

    Overwrites the q and k thirds of ``qkv`` with their features (pass a tensor nobody else reads).
    Requires fp32/fp64 without autocast and no autograd; results equal ``linear_attention`` on
    ``FEATURE_MAPS[feature_map]`` features up to float rounding. Why each step is shaped this way:
    φ runs once over the contiguous q|k slab; the products are ``linear_attention``'s no-grad ones on
    (B, H, N, D) views with row stride 3·H·D, which BLAS takes as a leading dimension (no copies), and
    its division writes (B, N, H, D) memory, so the final reshape is a view.
    """
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError("fused_linear_attention is inference-only; use linear_attention for training")
    b, n, width = qkv.shape
    a = num_heads * head_dim
    if width != 3 * a:
        raise ValueError(f"qkv has {width} features, expected 3·{num_heads}·{head_dim}")
    _apply_inplace_feature_map(feature_map, qkv[..., : 2 * a])
    t = qkv.view(b, n, 3, num_heads, head_dim).transpose(1, 3)  # (B, H, 3, N, D) strided view
    # linear_attention's no-grad products without its dtype/autocast plumbing (about 20 µs a block)
    return _mix_into_tokens(t[:, :, 0], t[:, :, 1], t[:, :, 2], eps).view(b, n, a)


def fused_linear_attention_proj(
    qkv: torch.Tensor,
    num_heads: int,
    head_dim: int,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    feature_map: str = "elu",
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """``proj(fused_linear_attention(qkv))`` with the output projection folded into the state.

    proj(out) = Σ_h (φq_h / den_h) (KV_h Wp_hᵀ) + b, so per image the (D, C) matrices KV_h Wp_hᵀ
    (cost independent of N) replace the per-token product φq·KV and the division pass: φq is
    scaled by 1/den once and the output projection's own GEMM does the rest. Same inputs and
    in-place contract as ``fused_linear_attention``; returns (B, N, C).
    """
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError("fused_linear_attention_proj is inference-only")
    b, n, width = qkv.shape
    a = num_heads * head_dim
    if width != 3 * a or proj_weight.shape[1] != a:
        raise ValueError(f"qkv has {width} features and proj takes {proj_weight.shape[1]}, expected 3·{a} and {a}")
    c = proj_weight.shape[0]
    _apply_inplace_feature_map(feature_map, qkv[..., : 2 * a])
    wpt = proj_weight.t().reshape(num_heads, head_dim, c)  # (H, Dv, C) view: rows of Wpᵀ per head
    scaled = qkv.new_empty(n, num_heads, head_dim)
    den = qkv.new_empty(num_heads, n)
    out = qkv.new_empty(b, n, c)
    for i in range(b):
        t = qkv[i].view(n, 3, num_heads, head_dim)
        q, k, v = (t[:, j].transpose(0, 1) for j in range(3))  # (H, N, D) strided views
        state = torch.bmm(torch.bmm(k.transpose(1, 2), v), wpt)  # (H, D, C): KV_h Wp_hᵀ
        normaliser(q, token_sum(k), den, per_head=q.device.type == "cpu")
        torch.div(q, den.add_(eps).unsqueeze(-1), out=scaled.transpose(0, 1))  # φq/den as (N, H·D)
        if proj_bias is None:
            torch.mm(scaled.view(n, a), state.view(a, c), out=out[i])
        else:
            torch.addmm(proj_bias, scaled.view(n, a), state.view(a, c), out=out[i])
    return out
