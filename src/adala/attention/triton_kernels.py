"""Triton kernels for inference linear attention on CUDA, read straight from the packed qkv projection.

Why: on a GPU at batch 1 the plain-torch path costs about a dozen launches and fp32 copies of q, k
and v per block (φ, casts, two bmm, a sum, a division, a layout copy): DINOv2-L with it runs at 0.74×
the flash teacher at 256² and 1.06× at 1024² on an H200, against 0.998× and 1.84× with these kernels.
Here a block costs three launches and no N-sized temporary besides its output:

1. ``_state_kernel``: grid (B·H, S). Each program applies φ to a run of key tiles in registers and
   accumulates its partial [φkᵀv | Σφk] (D×D + D) in fp32; S splits of the tokens keep every SM busy
   when B·H is small (16 programs for DINOv2-L at batch 1 would leave 116 of 132 SMs idle).
2. one ``sum`` over the S partials (skipped when S = 1): deterministic, unlike atomics.
3. ``_output_kernel``: grid (B·H, ⌈N/BLOCK⌉). φq·[KV | Σφk] and the division in registers, written
   as (B, N, H·D) in the input dtype, the layout the output projection reads (no transpose copy).

Sums and the normaliser accumulate in fp32 whatever the input dtype (bf16/fp16 products run as tf32,
fp32 ones as IEEE fp32). Set ``TRITON_INTERPRET=1`` before the first call to run them on CPU (tests).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - not installed, or broken on this platform: the torch kernels instead
    triton = None

FEATURE_MAP_IDS = {"elu": 0, "relu": 1}
HEAD_DIMS = (16, 32, 64, 128)
# triton reads TRITON_INTERPRET when it decorates the kernels, so the answer is fixed at import
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def supports(device: torch.device, dtype: torch.dtype, head_dim: int, feature_map: str) -> bool:
    """Whether ``linear_attention_triton`` takes a qkv of this device and dtype (else: torch kernels)."""
    return (
        triton is not None
        and (device.type == "cuda" or (INTERPRETED and device.type == "cpu"))
        and head_dim in HEAD_DIMS
        and feature_map in FEATURE_MAP_IDS
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


if triton is not None:

    @triton.jit
    def _phi(x, FMAP: tl.constexpr):
        if FMAP == 0:
            y = tl.where(x > 0, x + 1.0, tl.exp(x))  # ELU+1
        else:
            y = tl.maximum(x, 0.0)
        return y

    @triton.jit
    def _state_kernel(qkv, state, n_tokens, stride_b, stride_n, tiles_per_split, n_splits,
                      H: tl.constexpr, D: tl.constexpr, A: tl.constexpr, BLOCK: tl.constexpr,
                      FMAP: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, D)
        kv = tl.zeros((D, D), dtype=tl.float32)
        ks = tl.zeros((D,), dtype=tl.float32)
        for t in range(tiles_per_split):
            n = (split * tiles_per_split + t) * BLOCK + tl.arange(0, BLOCK)
            keep = (n < n_tokens)[:, None]
            row = qkv + b * stride_b + n[:, None] * stride_n + h * D + d[None, :]
            k = tl.load(row + A, mask=keep, other=0.0).to(tl.float32)
            v = tl.load(row + 2 * A, mask=keep, other=0.0).to(tl.float32)
            k = tl.where(keep, _phi(k, FMAP), 0.0)  # φ(0) = 1 for ELU+1: padding must not count
            kv += tl.dot(tl.trans(k), v, input_precision=PREC)
            ks += tl.sum(k, axis=0)
        out = state + (bh * n_splits + split) * (D * D + D)
        tl.store(out + d[:, None] * D + d[None, :], kv)
        tl.store(out + D * D + d, ks)

    @triton.jit
    def _output_kernel(qkv, state, out, n_tokens, stride_b, stride_n, out_stride_b, out_stride_n, eps,
                       H: tl.constexpr, D: tl.constexpr, A: tl.constexpr, BLOCK: tl.constexpr,
                       FMAP: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        d = tl.arange(0, D)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = (n < n_tokens)[:, None]
        q = tl.load(qkv + b * stride_b + n[:, None] * stride_n + h * D + d[None, :], mask=keep, other=0.0)
        q = _phi(q.to(tl.float32), FMAP)
        st = state + bh * (D * D + D)
        kv = tl.load(st + d[:, None] * D + d[None, :])
        ks = tl.load(st + D * D + d)
        num = tl.dot(q, kv, input_precision=PREC)
        den = tl.sum(q * ks[None, :], axis=1) + eps
        res = num / den[:, None]
        dst = out + b * out_stride_b + n[:, None] * out_stride_n + h * D + d[None, :]
        tl.store(dst, res.to(out.dtype.element_ty), mask=keep)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# Launch defaults from benchmarks/triton_tune.py on an H200 (DINOv2-L shapes, bf16): 32-token tiles, 4 warps,
# 3 pipeline stages and about 4 programs per SM cut a block's kernels from 61.7 to 55.8 µs at 5330 tokens
# and from 178 to 154 µs at 21317 against 64-token tiles and 2 programs per SM.
BLOCK_TOKENS = 32
PROGRAMS_PER_SM = 4
NUM_STAGES = 3


def linear_attention_triton(
    qkv: torch.Tensor, num_heads: int, head_dim: int, feature_map: str = "elu", eps: float = 1e-6,
    splits: int | None = None, block: int = BLOCK_TOKENS, num_warps: int = 4, num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """φq (φkᵀ v) / (φq · Σφk + eps) from the packed projection ``qkv`` (B, N, 3·H·D) -> (B, N, H·D).

    Inference only (no autograd); ``qkv`` is read, never written. ``splits`` (tests) overrides how
    many programs share one head's tokens; ``block`` (tokens per tile), ``num_warps`` and ``num_stages``
    are launch settings for tuning (``benchmarks/triton_tune.py``). Requires ``supports(...)`` and a
    unit stride on the last dim.
    """
    if not supports(qkv.device, qkv.dtype, head_dim, feature_map) or qkv.dim() != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"the triton kernels do not take this qkv ({qkv.device}, {qkv.dtype}, head_dim "
                         f"{head_dim}, feature map {feature_map!r}); use adala.attention.ops")
    b, n, width = qkv.shape
    a = num_heads * head_dim
    if width != 3 * a:
        raise ValueError(f"qkv has {width} features, expected 3·{num_heads}·{head_dim}")
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    tiles = -(-n // block)
    if splits is None:
        splits = max(1, -(-PROGRAMS_PER_SM * _sm_count(qkv.device) // (b * num_heads)))
    per_split = -(-tiles // max(1, min(splits, tiles)))
    splits = -(-tiles // per_split)
    prec = "ieee" if qkv.dtype == torch.float32 else "tf32"
    fmap = FEATURE_MAP_IDS[feature_map]
    d2 = head_dim * head_dim + head_dim
    state = torch.empty(b * num_heads, splits, d2, device=qkv.device, dtype=torch.float32)
    _state_kernel[(b * num_heads, splits)](
        qkv, state, n, qkv.stride(0), qkv.stride(1), per_split, splits,
        H=num_heads, D=head_dim, A=a, BLOCK=block, FMAP=fmap, PREC=prec, **launch,
    )
    state = state.sum(1) if splits > 1 else state.view(b * num_heads, d2)
    out = torch.empty(b, n, a, device=qkv.device, dtype=qkv.dtype)
    _output_kernel[(b * num_heads, tiles)](
        qkv, state, out, n, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), float(eps),
        H=num_heads, D=head_dim, A=a, BLOCK=block, FMAP=fmap, PREC=prec, **launch,
    )
    return out
