"""timm Eva family (DINOv3, PE-Core, EVA-02) on tiny random variants: surgery keeps every tensor, RoPE kinds
agree with an independent float64 reference (and a uniform rope shift does what that reference says),
stages 1 and 2 lower their losses, save/load is bit-exact, bench reports FLOP bounds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from family_helpers import run_stages_and_round_trip, sharpen
from timm.models.eva import Eva

import adala
from adala.attention.naive import linear_attention_reference, softmax_attention_reference
from adala.attention.rope import RopeKernelAttention
from adala.benchmark import bench, model_flops
from adala.errors import ConfigError, UnsupportedModelError

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
# dinov3: fused qkv without bias, 4 registers, rotate-half rope; eva02: separate q/k/v, SwiGLU, interleaved
# rope; pe-core: timm.layers.AttentionRope, map pooling, pre-norm
ARCHS = {
    "dinov3": ("vit_small_patch16_dinov3", {"img_size": 64, "init_values": 1.0, **TINY}, 64),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 56, **TINY}, 56),
    "pe-core": ("vit_pe_core_tiny_patch16_384", {"img_size": 64, **TINY}, 64),
}


def tiny_eva(name: str = "dinov3") -> torch.nn.Module:
    arch, kw, _ = ARCHS[name]
    return adala.load_teacher(f"timm:{arch}", pretrained=False, **kw)


@pytest.fixture(params=sorted(ARCHS))
def family(request):
    return request.param, tiny_eva(request.param), ARCHS[request.param][2]


def test_linearize_keeps_every_tensor_and_the_model_class(family):
    name, teacher, size = family
    student = adala.linearize(teacher, "linear-elu")
    assert isinstance(student, Eva)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(t_sd) == set(s_sd), name
    assert all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    assert all(isinstance(b.attn, RopeKernelAttention) and b.attn.kind == "linear-elu" for b in student.blocks)
    assert not any(isinstance(b.attn, RopeKernelAttention) for b in teacher.blocks)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert student.forward_features(x).shape == teacher.forward_features(x).shape


def test_rope_softmax_kind_reproduces_the_teacher(family):
    """Kind ``softmax`` runs the same projections, RoPE, sub-LN and proj as timm's block: same output."""
    name, teacher, size = family
    exact = copy.deepcopy(teacher)  # linearize(.., "softmax") keeps timm's modules: build the kind by hand
    for blk in exact.blocks:
        blk.attn = RopeKernelAttention(blk.attn, kind="softmax")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(exact.forward_features(x), teacher.forward_features(x), rtol=1e-5, atol=1e-5)


def test_unsupported_kind_for_eva_fails_in_one_line():
    with pytest.raises(UnsupportedModelError, match="not available for Eva models"):
        adala.linearize(tiny_eva(), "performer")
    with pytest.raises(ConfigError, match="unknown option dwc for attention linear-elu; it takes: eps, kernel, kind"):
        adala.linearize(tiny_eva(), dwc=3)  # the ViT kinds' conv has no rotary version: refused, not dropped


# --------------------------------------------------------------------------- float64 reference, by hand


def _rope_tensor(n: int, head_dim: int, half: bool, shift: float = 0.0) -> torch.Tensor:
    """A rope table (N, 2·D) = [sin | cos] for a 1-row grid of positions 0..N-1 (+ ``shift``), float64."""
    pos = torch.arange(n, dtype=torch.float64) + shift
    freqs = 1.0 / (100.0 ** (torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2)))
    ang = pos[:, None] * freqs[None, :]  # (N, D/2)
    if half:
        ang = torch.cat([ang, ang], -1)
    else:
        ang = ang.repeat_interleave(2, -1)
    return torch.cat([ang.sin(), ang.cos()], -1)


def _rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    sin, cos = rope[:, : x.shape[-1]], rope[:, x.shape[-1]:]
    if half:
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        turned = torch.cat([-b, a], -1)
    else:
        turned = torch.empty_like(x)
        turned[..., 0::2], turned[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return x * cos + turned * sin


def _reference(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor, half: bool, phi) -> torch.Tensor:
    """EVA attention written out: projections, RoPE after the prefix, φ (or softmax), norm, proj; float64."""
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = F.linear(x, attn.qkv.weight, bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = (p(x).reshape(b, n, h, d).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    p = attn.num_prefix_tokens
    q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, half)], 2)
    k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, half)], 2)
    out = softmax_attention_reference(q, k, v, d**-0.5) if phi is None else linear_attention_reference(
        phi(q), phi(k), v)
    return attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, h * d)))


PHI = {"linear-elu": lambda t: F.elu(t) + 1, "linear-relu": F.relu}


def _module_and_input(kind: str, half: bool):
    torch.manual_seed(1)
    arch = "vit_small_patch16_dinov3" if half else "eva02_tiny_patch14_224"
    kw = {"img_size": 64 if half else 56, **TINY, "qkv_bias": True}
    teacher = adala.load_teacher(f"timm:{arch}", pretrained=False, **kw).double()
    src = teacher.blocks[0].attn
    with torch.no_grad():
        for prm in src.parameters():  # non-zero biases and norms, so every term is exercised
            prm.add_(0.05 * torch.randn_like(prm))
    n_patch, prefix = 12, src.num_prefix_tokens
    x = torch.randn(2, prefix + n_patch, 64, dtype=torch.float64)
    return RopeKernelAttention(src, kind=kind), src, x, n_patch


@pytest.mark.parametrize("half", [True, False], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("kind", ["linear-elu", "linear-relu"])
def test_rope_kinds_match_the_float64_reference(kind, half):
    mod, src, x, n_patch = _module_and_input(kind, half)
    rope = _rope_tensor(n_patch, mod.head_dim, half)
    with torch.no_grad():
        got = mod(x, rope=rope)
        want = _reference(src, x, rope, half, PHI[kind])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        # the softmax block through the same reference: timm's own module agrees with it
        torch.testing.assert_close(src(x, rope=rope), _reference(src, x, rope, half, None), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("half", [True, False], ids=["rotate-half", "interleaved"])
def test_uniform_rope_shift_moves_kernel_attention_but_not_softmax(half):
    """A rotation-only change (every position shifted by the same offset): softmax depends on q·R_{j−i}k only, so
    the float64 reference is unchanged; φ(R_i q)·φ(R_j k) is not relative, so the kernel output moves, and the
    module moves exactly as the reference says."""
    mod, src, x, n_patch = _module_and_input("linear-elu", half)
    src.num_prefix_tokens = mod.num_prefix_tokens = 0  # prefix tokens carry no rotation: patches only here
    x = x[:, -n_patch:]
    r0 = _rope_tensor(n_patch, mod.head_dim, half)
    r1 = _rope_tensor(n_patch, mod.head_dim, half, shift=5.0)
    with torch.no_grad():
        soft0, soft1 = (_reference(src, x, r, half, None) for r in (r0, r1))
        lin0, lin1 = (_reference(src, x, r, half, PHI["linear-elu"]) for r in (r0, r1))
        assert (soft1 - soft0).abs().max() < 1e-10
        moved = ((lin1 - lin0).norm() / lin0.norm()).item()
        assert moved > 1e-3, moved
        got0, got1 = mod(x, rope=r0), mod(x, rope=r1)
        torch.testing.assert_close(got1 - got0, lin1 - lin0, rtol=1e-8, atol=1e-10)
        print(f"relative change of linear-elu output under a uniform rope shift: {moved:.3g}")


# --------------------------------------------------------------------------- stages, io, bench


def test_stages_lower_their_losses_and_save_load_is_bit_exact(tmp_path):
    reloaded, model = run_stages_and_round_trip(sharpen(tiny_eva("dinov3")), 64, tmp_path)
    assert isinstance(reloaded, Eva) and adala.models.block_kinds(reloaded) == ["linear-elu"] * 2
    x = torch.randn(1, 3, 96, 64)  # another (non-square) size: rope and patch grid follow
    with torch.no_grad():
        assert torch.equal(reloaded.forward_features(x), model.forward_features(x))


def test_flops_and_bench_rows():
    teacher = tiny_eva("eva02")
    student = adala.linearize(teacher, "linear-elu")
    t, s = model_flops(teacher, 112), model_flops(student, 112)
    n, d = 1 + 64, 32
    assert t["tokens"] == s["tokens"] == n
    assert t["attention"] == 2 * 2 * (4 * n * n * d)  # 2 blocks, 2 heads: QKᵀ and AV
    assert t["qkv"] == 2 * 2 * n * 64 * 3 * 64  # separate q/k/v projections counted
    assert s["attention"] < t["attention"]
    record = bench(f"timm:{ARCHS['eva02'][0]}", ["linear-elu"], resolutions=[56], repeats=1, warmup=0,
                   teacher_kwargs=ARCHS["eva02"][1] | {"pretrained": False}, memory=False)
    (c,) = record["comparisons"]
    assert c["flop_bound"] == pytest.approx(
        record["results"][0]["flops"] / record["results"][1]["flops"]) and c["speedup"] > 0
