"""The fast linear-attention paths against the float64 N×N reference (no timing assertions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adala
import adala.attention.linear as linear_mod
from adala.attention.naive import linear_attention_reference
from adala.attention.ops import (
    FEATURE_MAPS,
    clear_workspace,
    elu_plus_one,
    fused_linear_attention,
    fused_linear_attention_proj,
    linear_attention,
    normaliser,
)

FMAPS_F64 = {"elu": lambda x: F.elu(x.double()) + 1.0, "relu": lambda x: F.relu(x.double())}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _packed(b: int, n: int, h: int, d: int, std: float = 1.0, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float64) * std).to(dtype)


def _split(qkv: torch.Tensor, h: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _reference(qkv: torch.Tensor, h: int, d: int, fmap: str = "elu") -> torch.Tensor:
    """Float64 N×N reference in the fused layout (B, N, H·D)."""
    q, k, v = _split(qkv.double(), h, d)
    out = linear_attention_reference(FMAPS_F64[fmap](q), FMAPS_F64[fmap](k), v)
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], h * d)


def _tiny_attention(kind: str = "linear-elu", heads: int = 2, dim: int = 64) -> torch.nn.Module:
    t = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=1,
                           embed_dim=dim, num_heads=heads)
    return adala.linearize(t, kind).blocks[0].attn


def _module_reference(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's math in float64 via the N×N reference (proj included)."""
    w, bias = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = x.double() @ w.T + bias
    mixed = _reference(qkv, attn.num_heads, attn.head_dim, attn.feature_map_name)
    return mixed @ attn.proj.weight.double().T + attn.proj.bias.double()


@pytest.mark.parametrize("fmap", ["elu", "relu"])
# (1, 1400, 6, 64): a q|k slab above EXP_PATH_MAX_NUMEL, so ELU+1 takes its large-tensor path
@pytest.mark.parametrize(("b", "n", "h", "d"),
                         [(1, 1, 1, 8), (1, 257, 6, 64), (3, 37, 4, 16), (2, 1001, 3, 24), (1, 1400, 6, 64)])
def test_fused_matches_float64_reference(fmap, b, n, h, d):
    qkv = _packed(b, n, h, d)
    ref = _reference(qkv, h, d, fmap)
    with torch.no_grad():
        out = fused_linear_attention(qkv.clone(), h, d, fmap)
    assert out.shape == (b, n, h * d) and out.dtype == torch.float32 and out.is_contiguous()
    assert _rel(out, ref) < 2e-6


def test_fused_float64_stays_float64():
    qkv = _packed(2, 99, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        out = fused_linear_attention(qkv.clone(), 2, 8)
    assert out.dtype == torch.float64
    assert _rel(out, _reference(qkv, 2, 8)) < 1e-12


def test_fused_refuses_autograd_and_bad_width():
    qkv = _packed(1, 5, 2, 4).requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        fused_linear_attention(qkv, 2, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="expected"):
        fused_linear_attention(qkv.detach()[..., :-1], 2, 4)


@pytest.mark.parametrize("fmap", ["elu", "relu"])
def test_no_grad_kernel_matches_reference_and_reshapes_for_free(fmap):
    q, k, v = _split(_packed(3, 131, 4, 16), 4, 16)  # strided (B, H, N, D) views, as timm makes them
    phi = FEATURE_MAPS[fmap]
    ref = linear_attention_reference(phi(q), phi(k), v)
    with torch.no_grad():
        out = linear_attention(phi(q), phi(k), v)
    assert out.shape == (3, 4, 131, 16)
    assert _rel(out, ref) < 1e-6
    assert out.transpose(1, 2).is_contiguous()  # the caller's transpose+reshape is a view


@pytest.mark.parametrize("kind", ["linear-elu", "linear-relu"])
@pytest.mark.parametrize("n", [1, 17, 67, 400])
@pytest.mark.parametrize("fold", [True, False])
def test_module_fused_equals_autograd_path_and_reference(kind, n, fold):
    """No-grad calls take a fused kernel (proj folded into the state, or kept apart when a hook
    watches proj's input); autograd calls take mix(). All match the float64 reference."""
    attn = _tiny_attention(kind, heads=4, dim=64)
    x = torch.randn(2, n, 64)
    calls = []
    seen = []
    names = ("fused_linear_attention", "fused_linear_attention_proj")
    orig = {name: getattr(linear_mod, name) for name in names}

    def spy(name):
        def f(*a, **kw):
            calls.append(name)
            return orig[name](*a, **kw)

        return f

    for name in names:
        setattr(linear_mod, name, spy(name))
    hook = None if fold else attn.proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape) or None)
    try:
        with torch.no_grad():
            fast = attn(x)
        slow = attn(x.clone().requires_grad_())
    finally:
        for name in names:
            setattr(linear_mod, name, orig[name])
        if hook is not None:
            hook.remove()
    folded = fold and n >= 64  # proj folds from N ≥ C tokens on
    assert calls == [names[1] if folded else names[0]]  # no-grad took a fused path, autograd did not
    assert len(seen) == (0 if fold else 2)  # a hook on proj still sees proj's input
    ref = _module_reference(attn, x)
    assert _rel(fast, ref) < 2e-6 and _rel(slow, ref) < 2e-6
    assert torch.allclose(fast, slow.detach(), rtol=1e-5, atol=1e-6)


def test_fused_proj_kernel_matches_reference_without_bias_and_in_float64():
    h, d, c = 3, 8, 20
    w = torch.randn(c, h * d, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        qkv = _packed(2, 45, h, d, dtype=dtype)
        ref = _reference(qkv, h, d) @ w.T
        with torch.no_grad():
            out = fused_linear_attention_proj(qkv.clone(), h, d, w.to(dtype), None)
        assert out.dtype == dtype and out.shape == (2, 45, c)
        assert _rel(out, ref) < tol


def test_module_fused_leaves_input_untouched_and_skips_hooked_qkv():
    attn = _tiny_attention()
    x = torch.randn(1, 23, 64)
    x0 = x.clone()
    seen = []
    with torch.no_grad():
        attn(x)
        assert torch.equal(x, x0)
        h = attn.qkv.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()) or None)
        try:
            out = attn(x)
        finally:
            h.remove()
    # a hook that kept the projection must not see it overwritten by the in-place feature map
    w, b = attn.qkv.weight, attn.qkv.bias
    assert torch.allclose(seen[0], x @ w.T + b, atol=1e-5)
    assert _rel(out, _module_reference(attn, x)) < 2e-6


def test_module_under_bf16_autocast_within_bf16_tolerance():
    attn = _tiny_attention(heads=2, dim=64)
    x = torch.randn(2, 301, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _module_reference(attn, x)) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_activations_stay_finite(dtype):
    qkv = _packed(2, 300, 3, 16, std=30.0)
    with torch.no_grad():
        if dtype == torch.float32:
            out = fused_linear_attention(qkv.clone(), 3, 16)
        else:
            q, k, v = _split(qkv.bfloat16(), 3, 16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = linear_attention(elu_plus_one(q), elu_plus_one(k), v)
    assert torch.isfinite(out).all()
    attn = _tiny_attention()
    x = torch.randn(1, 50, 64) * 30
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert torch.isfinite(attn(x)).all()


def test_relu_all_zero_features_give_zero_in_fused_path():
    qkv = _packed(1, 9, 2, 4)
    qkv[..., :8] = -qkv[..., :8].abs()  # every query feature is ReLU'd to 0
    with torch.no_grad():
        out = fused_linear_attention(qkv, 2, 4, "relu")
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_module_gradients_match_float64_reference():
    attn = _tiny_attention(heads=2, dim=8).double()
    for p in attn.parameters():
        p.requires_grad_(True)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(attn, (x,))
    out = attn(x)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, attn.qkv.weight), g)
    xr = x.detach().clone().requires_grad_()
    ref = _module_reference(attn, xr)
    gxr, gwr = torch.autograd.grad(ref, (xr, attn.qkv.weight), g)
    assert _rel(gx, gxr) < 1e-10 and _rel(gw, gwr) < 1e-10


@pytest.mark.parametrize("fold", [False, True])
def test_fused_memory_far_below_n_squared(fold):
    """At 8192 tokens one softmax matrix is 256 MiB per head in fp32; the fused paths allocate O(N·D)
    (output and one scratch buffer), summed over every allocation they make."""
    from torch.profiler import ProfilerActivity, profile

    n, h, d = 8192, 2, 32
    qkv = _packed(1, n, h, d)
    w = torch.randn(h * d, h * d)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if fold:
            fused_linear_attention_proj(qkv, h, d, w, None)
        else:
            fused_linear_attention(qkv, h, d)
    allocated = sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0)
    n2_per_head = n * n * 4
    assert 0 < allocated < n2_per_head / 16


@pytest.mark.parametrize("n", [41, 600])  # below and above NORMALISER_PRODUCT_BELOW_TOKENS
@pytest.mark.parametrize("per_head", [True, False])
def test_normaliser_every_branch(per_head, n):
    """The GPU branch (one bmm) runs on CPU too, so it is checked here even without a GPU; q is a strided
    view of a packed projection as in the fused path."""
    packed = torch.rand(n, 3, 3, 8, dtype=torch.float64)
    q, ksum = packed[:, 0].transpose(0, 1), torch.rand(3, 8, dtype=torch.float64)
    den = torch.empty(3, n, dtype=torch.float64)
    normaliser(q, ksum, den, per_head=per_head)
    assert torch.allclose(den, torch.einsum("hnd,hd->hn", q, ksum), rtol=1e-12)


def test_token_sum_layouts():
    from adala.attention.ops import token_sum

    packed = torch.randn(37, 3, 4, 8)  # (N, 3, H, D) like a qkv projection
    for k in (packed[:, 1].transpose(0, 1), packed[:, 1].transpose(0, 1).contiguous(), torch.randn(4, 8, 37).mT):
        assert torch.allclose(token_sum(k), k.sum(1), atol=1e-5)


@pytest.mark.parametrize("kept", [False, True])
def test_workspace_reuse_across_calls_modes_and_threads(monkeypatch, kept):
    """The CPU workspace (the packed projection of a lone attention, φ(q) of a streamed block) is reused:
    consecutive calls of different sizes, inference mode and plain no-grad, several modules in a row, and
    concurrent threads must all stay exact. Where the process keeps freed memory (adala.runtime) both are
    plain tensors and no workspace is held."""
    import threading

    from adala import runtime
    from adala.attention.ops import _WORKSPACE
    from adala.models import linear_block

    monkeypatch.setitem(runtime._STATE, "applied", kept)
    monkeypatch.setitem(linear_block._STATE, "chunk_tokens", 16)  # blocks stream in chunks from 17 tokens on

    t = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=2,
                           embed_dim=64, num_heads=2)
    s = adala.linearize(t, "linear-elu")
    xs = [torch.randn(b, 3, r, r) for b, r in ((2, 56), (1, 28), (3, 84), (1, 56))]
    refs = [s.forward_features(x.clone().requires_grad_()).detach() for x in xs]  # autograd path
    clear_workspace()
    for x, ref in zip(xs, refs):
        with torch.inference_mode():
            assert torch.allclose(s.forward_features(x), ref, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(s.forward_features(x), ref, atol=1e-5)
    assert bool(_WORKSPACE.bufs) is not kept
    clear_workspace()
    tokens = torch.randn(2, 37, 64)
    ref = s.blocks[0].attn(tokens.clone().requires_grad_()).detach()  # autograd path
    with torch.no_grad():  # a lone attention module: the packed projection
        assert torch.allclose(s.blocks[0].attn(tokens), ref, atol=1e-5)
    assert bool(_WORKSPACE.bufs) is not kept
    errors = []

    def work(i):
        for _ in range(3):
            with torch.inference_mode():
                if not torch.allclose(s.forward_features(xs[i]), refs[i], atol=1e-5):
                    errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    clear_workspace()


@pytest.mark.slow
def test_compiled_feature_map_matches_reference():
    """Opt-in torch.compile of ELU+1 (one pass): same results; compiling C++ takes tens of seconds."""
    from adala.attention.ops import set_compiled_feature_maps

    qkv = _packed(2, 77, 3, 16, std=3.0)
    old = set_compiled_feature_maps(True)
    try:
        with torch.no_grad():
            out = fused_linear_attention(qkv.clone(), 3, 16)
    finally:
        set_compiled_feature_maps(old)
    assert _rel(out, _reference(qkv, 3, 16)) < 2e-6
