"""Linear-attention kernels against an independent float64 N×N reference."""

from __future__ import annotations

import pytest
import torch

from adala.attention import available, build
from adala.attention.naive import linear_attention_reference, softmax_attention_reference
from adala.attention.ops import elu_plus_one, linear_attention, relu
from adala.errors import UnknownAttentionError


def _qkv(b=2, h=3, n=37, d=16, std=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) * std for _ in range(3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fmap", [elu_plus_one, relu])
@pytest.mark.parametrize("n", [1, 37, 257, 1000])
def test_kernel_matches_float64_reference(fmap, n):
    q, k, v = _qkv(n=n)
    out = linear_attention(fmap(q), fmap(k), v)
    ref = linear_attention_reference(fmap(q), fmap(k), v)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 1e-6


def test_kernel_float64_inputs_stay_float64():
    q, k, v = _qkv(dtype=torch.float64)
    out = linear_attention(elu_plus_one(q), elu_plus_one(k), v)
    assert out.dtype == torch.float64
    assert _rel(out, linear_attention_reference(elu_plus_one(q), elu_plus_one(k), v)) < 1e-12


def test_kernel_under_bf16_autocast_accumulates_in_fp32():
    q, k, v = _qkv(n=513)
    ref = linear_attention_reference(elu_plus_one(q), elu_plus_one(k), v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(elu_plus_one(q.bfloat16()), elu_plus_one(k.bfloat16()), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 2e-2  # bf16 input/output rounding only; sums are fp32


@pytest.mark.parametrize("fmap", [elu_plus_one, relu])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_finite_for_large_activations(fmap, dtype):
    q, k, v = _qkv(n=300, std=30.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = linear_attention(fmap(q.to(dtype)), fmap(k.to(dtype)), v.to(dtype))
    assert torch.isfinite(out).all()


def test_relu_all_zero_features_give_zero_not_nan():
    q, k, v = _qkv(n=8)
    out = linear_attention(relu(-q.abs()), relu(k), v)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_kernel_gradients_match_reference():
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, h=2, n=9, d=4))
    torch.autograd.gradcheck(lambda a, b, c: linear_attention(elu_plus_one(a), elu_plus_one(b), c), (q, k, v))


def test_registry_names_and_unknown_kind():
    assert {"softmax", "linear-elu", "linear-relu"} <= set(available())
    with pytest.raises(UnknownAttentionError, match="available: .*linear-elu"):
        build("no-such-kind", torch.nn.Identity())


def test_softmax_reference_agrees_with_sdpa():
    q, k, v = _qkv(n=20)
    ref = softmax_attention_reference(q, k, v, q.shape[-1] ** -0.5)
    assert _rel(torch.nn.functional.scaled_dot_product_attention(q, k, v), ref) < 1e-6


def test_linear_memory_is_far_below_n_squared():
    """At 4096 tokens a softmax matrix is 64 MiB per head in fp32; linear attention must not build it."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _qkv(b=1, h=2, n=4096, d=32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        linear_attention(elu_plus_one(q), elu_plus_one(k), v)
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    n2_per_head = 4096 * 4096 * 4
    assert 0 < biggest < n2_per_head / 16
