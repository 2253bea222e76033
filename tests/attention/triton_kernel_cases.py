"""The Triton linear-attention kernels against the float64 N×N reference.

Run on a CUDA machine as ``python -m pytest tests/triton_kernel_cases.py``; on CPU
``test_kernels_triton.py`` runs this file in a subprocess with ``TRITON_INTERPRET=1`` (triton reads
it when the kernels are defined, so it cannot be switched on inside one process).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adala
import adala.attention.triton_kernels as tk
from adala.attention.naive import linear_attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FMAPS_F64 = {"elu": lambda x: F.elu(x.double()) + 1.0, "relu": lambda x: F.relu(x.double())}
# relative Frobenius error vs float64: fp32 to rounding; half precision to its output rounding
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def test_kernels_are_usable_here() -> None:
    # the subprocess must really run the kernels: interpreter on CPU, compiled on CUDA
    assert tk.triton is not None
    assert tk.supports(DEVICE, torch.bfloat16, 64, "elu")
    assert not tk.supports(DEVICE, torch.bfloat16, 24, "elu")  # no power of two: torch path
    assert not tk.supports(DEVICE, torch.float64, 64, "elu")


def _reference(qkv: torch.Tensor, h: int, d: int, fmap: str, eps: float = 1e-6) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.double().reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = linear_attention_reference(FMAPS_F64[fmap](q), FMAPS_F64[fmap](k), v, eps)
    return out.transpose(1, 2).reshape(b, n, h * d)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _packed(b: int, n: int, h: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b,n,h,d,fmap,splits",
    [
        (1, 1, 2, 16, "elu", None),  # one token
        (2, 37, 3, 16, "elu", None),  # odd N, batch > 1
        (1, 131, 2, 32, "relu", 3),  # N not a multiple of the 32-token tile, split over 3 programs
        (3, 65, 2, 64, "elu", 2),  # one token past two tiles, batch 3
        (1, 200, 1, 128, "elu", None),  # D = 128
    ],
)
def test_kernel_matches_float64_reference(dtype, b, n, h, d, fmap, splits) -> None:
    qkv = _packed(b, n, h, d, dtype)
    before = qkv.clone()
    out = tk.linear_attention_triton(qkv, h, d, fmap, splits=splits)
    assert out.shape == (b, n, h * d) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(qkv, before)  # read, never written
    assert _rel(out, _reference(qkv, h, d, fmap)) < TOL[dtype]


def test_launch_settings_do_not_change_the_result_beyond_rounding() -> None:
    qkv = _packed(1, 300, 2, 32, torch.float32, seed=1)
    one = tk.linear_attention_triton(qkv, 2, 32, splits=1)
    five = tk.linear_attention_triton(qkv, 2, 32, splits=5)
    tuned = tk.linear_attention_triton(qkv, 2, 32, block=64, num_warps=8, num_stages=2)
    assert _rel(one, five) < 1e-6 and _rel(one, tuned) < 1e-6


def test_strided_batch_and_large_logits() -> None:
    # a qkv slice of a wider batch (batch stride != N·3A) and ELU's exp branch at large |x|
    big = _packed(4, 70, 2, 16, torch.float32, seed=2) * 6.0
    qkv = big[1:4:2]
    assert not qkv.is_contiguous()
    assert _rel(tk.linear_attention_triton(qkv, 2, 16), _reference(qkv, 2, 16, "elu")) < 1e-5


def test_bad_calls_are_value_errors() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        tk.linear_attention_triton(_packed(1, 8, 2, 16, torch.float32)[..., :90], 2, 16)
    with pytest.raises(ValueError, match="do not take"):
        tk.linear_attention_triton(_packed(1, 8, 2, 16, torch.float64), 2, 16)


def _tiny_pair(heads: int = 2, dim: int = 64):
    t = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2,
                           embed_dim=dim, num_heads=heads).to(DEVICE)
    return adala.linearize(t, "linear-elu").eval(), adala.linearize(t, "linear-elu", kernel="torch").eval()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_linearized_model_takes_the_kernels_and_matches_the_torch_path(autocast, monkeypatch) -> None:
    fast, ref = _tiny_pair()
    calls = []
    real = tk.linear_attention_triton
    monkeypatch.setattr(tk, "linear_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 3, 70, 70, generator=torch.Generator().manual_seed(0)).to(DEVICE)  # 26 tokens
    with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=autocast or torch.float32,
                                                 enabled=autocast is not None):
        got = fast.forward_features(x)
        want = ref.forward_features(x)
    assert len(calls) == 2  # one per block
    assert _rel(got, want) < (1e-5 if autocast is None else 3e-2)


def test_training_and_odd_head_sizes_keep_the_torch_path(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(tk, "linear_attention_triton", lambda *a, **k: calls.append(1))
    fast, _ = _tiny_pair(heads=2, dim=48)  # head_dim 24: no kernel for it
    with torch.inference_mode():
        fast.forward_features(torch.randn(1, 3, 56, 56, device=DEVICE))
    fast, _ = _tiny_pair()
    for p in fast.parameters():
        p.requires_grad_(True)
    fast.forward_features(torch.randn(1, 3, 56, 56, device=DEVICE)).sum().backward()
    assert not calls
    assert fast.blocks[0].attn.qkv.weight.grad is not None
