"""The recomputing linear-attention autograd Function against plain float64 autograd through the N×N reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adala
from adala.attention.naive import linear_attention_reference
from adala.attention.recompute import linear_attention_recompute, packed_linear_attention_recompute

PHI = {"elu": lambda x: F.elu(x) + 1.0, "relu": F.relu}  # independent of adala's feature maps


def _split(qkv, h, d):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)


def _reference(qkv, h, d, name, eps, weight=None, bias=None):
    """Naive float64 math with plain autograd: A = φq φkᵀ explicitly, row-normalised."""
    q, k, v = _split(qkv, h, d)
    out = linear_attention_reference(PHI[name](q), PHI[name](k), v, eps)
    out = out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], h * d)
    return out if weight is None else F.linear(out, weight, bias)


@pytest.mark.parametrize("name", ["elu", "relu"])
@pytest.mark.parametrize("n", [5, 7])
def test_gradcheck_float64_split_and_packed(name, n):
    g = torch.Generator().manual_seed(n)
    b, h, d = 2, 3, 4
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, h * d, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    eps = 1e-2  # large enough to matter in the normaliser

    def split(x):
        q, k, v = _split(x, h, d)
        return linear_attention_recompute(q, k, v, name, eps)

    assert torch.autograd.gradcheck(split, (qkv,))
    assert torch.autograd.gradcheck(lambda x: packed_linear_attention_recompute(x, h, d, name, eps), (qkv,))
    assert torch.autograd.gradcheck(lambda x, w_, b_: packed_linear_attention_recompute(x, h, d, name, eps, w_, b_),
                                    (qkv, w, bias))
    # and the same values and gradients as the independent reference (prefix tokens are just tokens here)
    grad_out = torch.randn(b, n, 5, dtype=torch.float64, generator=g)
    got = packed_linear_attention_recompute(qkv, h, d, name, eps, w, bias)
    want = _reference(qkv, h, d, name, eps, w, bias)
    torch.testing.assert_close(got, want)
    gg = torch.autograd.grad(got, (qkv, w, bias), grad_out)
    gw = torch.autograd.grad(want, (qkv, w, bias), grad_out)
    for a, r in zip(gg, gw):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("n", [6, 520])
@pytest.mark.parametrize("trained", ["qkv", "weight", "qkv+weight"])
def test_partial_gradients_match_reference(trained, n):
    """Stage 1 freezes ``proj`` (no recomputed output then), a frozen-attention fine-tune needs only the weight's
    gradient (the output without the backward): each combination against the reference."""
    g = torch.Generator().manual_seed(3)
    b, h, d = 2, 2, 4
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64, generator=g, requires_grad="qkv" in trained)
    w = torch.randn(5, h * d, dtype=torch.float64, generator=g, requires_grad="weight" in trained)
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad="weight" in trained)
    grad_out = torch.randn(b, n, 5, dtype=torch.float64, generator=g)
    leaves = [t for t in (qkv, w, bias) if t.requires_grad]
    got = torch.autograd.grad(packed_linear_attention_recompute(qkv, h, d, "elu", 1e-3, w, bias), leaves, grad_out)
    want = torch.autograd.grad(_reference(qkv, h, d, "elu", 1e-3, w, bias), leaves, grad_out)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("n", [20, 520])  # whole-batch products below 512 tokens, per image above
def test_matches_reference_both_paths(n):
    g = torch.Generator().manual_seed(0)
    b, h, d = 2, 2, 8
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64, generator=g, requires_grad=True)
    grad_out = torch.randn(b, n, h * d, dtype=torch.float64, generator=g)
    got = packed_linear_attention_recompute(qkv, h, d, "elu", 1e-6)
    want = _reference(qkv, h, d, "elu", 1e-6)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, qkv, grad_out)[0],
                               torch.autograd.grad(want, qkv, grad_out)[0])


def _saved_bytes(fn, *args):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def test_saves_only_q_k_v():
    b, n, h, d = 2, 300, 3, 16
    qkv = torch.randn(b, n, 3 * h * d, requires_grad=True)
    x = qkv * 1.0  # a non-leaf projection output, like the qkv Linear's
    q, k, v = _split(x, h, d)
    saved, out = _saved_bytes(linear_attention_recompute, q, k, v)
    assert saved == x.untyped_storage().nbytes()  # q, k, v are views of x: nothing else is kept
    saved, out = _saved_bytes(lambda t: packed_linear_attention_recompute(t, h, d), x)
    assert saved == x.untyped_storage().nbytes()
    # the plain-autograd formulation keeps φq, φk, the state and more on top (what this Function is for)
    plain, _ = _saved_bytes(lambda a, b_, c: adala.attention.ops.linear_attention(F.elu(a) + 1, F.elu(b_) + 1, c),
                            q, k, v)
    assert plain > 2 * x.untyped_storage().nbytes()
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_folded_projection_keeps_qkv_and_weight_only():
    b, n, h, d = 2, 300, 3, 16
    x = torch.randn(b, n, 3 * h * d, requires_grad=True) * 1.0
    w = torch.randn(40, h * d, requires_grad=True)
    saved, _ = _saved_bytes(lambda t: packed_linear_attention_recompute(t, h, d, "elu", 1e-6, w, None), x)
    assert saved == x.untyped_storage().nbytes() + w.untyped_storage().nbytes()


def test_bf16_autocast_sums_in_fp32():
    g = torch.Generator().manual_seed(1)
    b, n, h, d = 1, 600, 2, 16
    x = (torch.randn(b, n, 3 * h * d, generator=g) + 0.5).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_linear_attention_recompute(x, h, d, "elu")
    assert out.dtype == torch.bfloat16
    want = _reference(x.detach().double(), h, d, "elu", 1e-6)
    # fp32 sums: only the bf16 rounding of the output (~4e-3 relative) remains, not a sum's error over 600 tokens
    torch.testing.assert_close(out.double(), want, rtol=8e-3, atol=1e-3)
    out.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    xd = x.detach().double().requires_grad_(True)
    _reference(xd, h, d, "elu", 1e-6).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=3e-2, atol=3e-2)


@pytest.fixture(scope="module")
def tiny_teacher():
    return adala.load_teacher("dinov2-s14", pretrained=False, img_size=56, depth=1, embed_dim=32, num_heads=2).double()


@pytest.mark.parametrize("kind", ["linear-elu", "linear-relu"])
@pytest.mark.parametrize("options", [{}, {"temperature": True}, {"dwc": 3}])
def test_module_training_path_matches_plain_mix(tiny_teacher, kind, options):
    """LinearAttention's packed training path (folded proj, dwc) against kernel="torch" (split q, k, v) in float64."""
    teacher = tiny_teacher
    fast = adala.linearize(teacher, kind, **options).double().train()
    ref = adala.linearize(teacher, kind, kernel="torch", **options).double().train()
    for m in (fast, ref):
        attn = adala.models.surgery.attention_modules(m)[0]
        if attn.dwc is not None:
            torch.nn.init.normal_(attn.dwc.weight, generator=torch.Generator().manual_seed(3))
        if attn.log_tau is not None:
            attn.log_tau.data.fill_(0.3)
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = []
    for m in (fast, ref):
        vit = adala.models.surgery.backbone_of(m)
        y = vit.forward_features(x)
        y.pow(2).mean().backward()
        outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, r in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, r)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="feature map"):
        packed_linear_attention_recompute(torch.zeros(1, 2, 12), 1, 4, "gelu")
    with pytest.raises(ValueError, match="qkv must be"):
        packed_linear_attention_recompute(torch.zeros(1, 2, 10), 1, 4)
