"""SAM image encoder (timm VisionTransformerSAM) on a tiny random variant: global blocks linearized by default,
windowed ones on request, (B, H, W, C) attention, relative position bias dropped or approximated against an
independent float64 reference, stages, save/load, FLOPs with windows, bench rows, the ``sam-b16`` alias."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from family_helpers import FAST, run_stages_and_round_trip, sharpen
from timm.models.vision_transformer_sam import VisionTransformerSAM

import adala
from adala.attention.sam import SamKernelAttention
from adala.benchmark import bench, model_flops
from adala.errors import ConfigError, OfflineError
from adala.stages import align_attention

TINY = {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2, "window_size": 2,
        "global_attn_indexes": [1], "use_rel_pos": True}


def tiny_sam(sigma: float = 0.5, **kw) -> torch.nn.Module:
    """timm zero-initialises the rel-pos tables; random ones make the bias (and the drop/approx choice) matter."""
    model = adala.load_teacher("timm:samvit_base_patch16", pretrained=False, **(TINY | kw))
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.rel_pos_h.normal_(0, sigma)
            blk.attn.rel_pos_w.normal_(0, sigma)
    return model


def test_global_blocks_by_default_windowed_on_request_tensors_kept():
    teacher = tiny_sam()
    student = adala.linearize(teacher)
    assert isinstance(student, VisionTransformerSAM)
    assert adala.models.block_kinds(student) == ["softmax", "linear-elu"]
    assert type(student.blocks[0].attn) is type(teacher.blocks[0].attn)  # the windowed block is untouched
    every = adala.linearize(teacher, blocks="all")
    assert adala.models.block_kinds(every) == ["linear-elu", "linear-elu"]
    t_sd = teacher.state_dict()
    for m in (student, every):
        s_sd = m.state_dict()
        assert set(s_sd) == set(t_sd) and all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    x = torch.randn(1, 3, 64, 96)  # non-square: windows padded, rel-pos interpolated
    with torch.no_grad():
        assert every.forward_features(x).shape == teacher.forward_features(x).shape
    with pytest.raises(ConfigError, match="blocks must be one of"):
        adala.linearize(teacher, blocks="windowed")
    with pytest.raises(ConfigError, match="rel_pos must be one of"):
        adala.linearize(teacher, rel_pos="learn")
    with pytest.raises(ConfigError,
                       match="unknown option dwc for attention linear-elu; it takes: eps, kernel, kind, rel_pos"):
        adala.linearize(teacher, dwc=3)


def test_softmax_kind_is_bit_exact_and_drop_warns():
    teacher = tiny_sam()
    exact = copy.deepcopy(teacher)
    for blk in exact.blocks:
        blk.attn = SamKernelAttention(blk.attn, kind="softmax")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(exact.forward_features(x), teacher.forward_features(x))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        adala.linearize(teacher, rel_pos="drop")
    assert any("relative position bias dropped" in str(w.message) for w in got)


# --------------------------------------------------------------------------- float64 reference, by hand


def _reference(attn, x: torch.Tensor, phi, rel_pos: str | None) -> torch.Tensor:
    """SAM attention on a (B, H, W, C) grid with the N×N matrix written out, bias built by explicit loops.

    rel_pos None: softmax(s·qkᵀ + bias); "drop": φq·φk; "approx": φq_i·φk_j·exp(w_j − max w), w_j = mean_i bias_ij."""
    b, gh, gw, c = x.shape
    n, h = gh * gw, attn.num_heads
    d = c // h
    q, k, v = attn.qkv(x.reshape(b, n, c)).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    rh, rw = attn.rel_pos_h, attn.rel_pos_w  # (2H−1, D), (2W−1, D): no interpolation at the native size
    bias = torch.zeros(b, h, n, n, dtype=x.dtype)
    for i in range(n):
        ri, ci = divmod(i, gw)
        for j in range(n):
            rj, cj = divmod(j, gw)
            bias[:, :, i, j] = q[:, :, i] @ rh[ri - rj + gh - 1] + q[:, :, i] @ rw[ci - cj + gw - 1]
    if rel_pos is None:
        a = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + bias, -1)
    else:
        a = torch.einsum("bhnd,bhmd->bhnm", phi(q), phi(k))
        if rel_pos == "approx":
            w = bias.mean(2, keepdim=True)  # (B, heads, 1, N): one weight per key
            a = a * torch.exp(w - w.amax(-1, keepdim=True))  # scaled to max 1: cancels but for the eps
        a = a / (a.sum(-1, keepdim=True) + 1e-6)
    out = (a @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out).reshape(b, gh, gw, c)


PHI = {"linear-elu": lambda t: F.elu(t) + 1, "linear-relu": F.relu}


@pytest.mark.parametrize("rel_pos", ["approx", "drop"])
@pytest.mark.parametrize("kind", ["linear-elu", "linear-relu"])
def test_sam_kinds_match_the_float64_reference(kind, rel_pos):
    teacher = tiny_sam().double()
    src = teacher.blocks[1].attn  # the global block: 4×4 grid
    x = torch.randn(2, 4, 4, 64, dtype=torch.float64)
    mod = SamKernelAttention(src, kind=kind, rel_pos=rel_pos)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), _reference(src, x, PHI[kind], rel_pos), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(src(x), _reference(src, x, None, None), rtol=1e-9, atol=1e-10)
        if rel_pos == "approx":  # the bias matters: dropping it gives another answer
            assert not torch.allclose(mod(x), _reference(src, x, PHI[kind], "drop"), atol=1e-6)


# --------------------------------------------------------------------------- stages, io, flops, bench


def test_stages_lower_their_losses_and_save_load_is_bit_exact(tmp_path):
    # stage 2 on attention+proj: with trainable="all" Adam's first steps on the neck's LayerNorm2d and the patch
    # embedding cost more than 10 steps win back on this 64-wide model (measured: 0.089 -> 0.123)
    reloaded, model = run_stages_and_round_trip(sharpen(tiny_sam()), 64, tmp_path, lr2=3e-4,
                                                train2="attention+proj")
    assert isinstance(reloaded, VisionTransformerSAM)
    assert adala.models.block_kinds(reloaded) == ["softmax", "linear-elu"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded.forward_features(x), model.forward_features(x))


def test_stage1_train_all_feeds_windowed_blocks_their_partitioned_input(tmp_path):
    teacher = tiny_sam()
    student = adala.linearize(teacher, blocks="all")
    res = align_attention(teacher, student, data="photos", img_size=64, steps=1, batch_size=2, lr=1e-3,
                          trainable="all", out=tmp_path / "s1", **FAST)
    assert {"rel_err/block_0", "rel_err/block_1"} <= set(res.metrics)
    assert res.metrics["rel_err/block_0"] < 10


def test_flops_count_windows_and_the_neck():
    teacher = tiny_sam()
    every = adala.linearize(teacher, blocks="all")
    f = model_flops(teacher, 64)
    n, d, c = 16, 32, 64
    win = 4 * 2 * (4 * 4 * 4 * d)  # block 0: 4 windows × 2 heads × (QKᵀ + AV = 4·m²·d), m = 4 tokens
    glob = 2 * (4 * n * n * d)  # block 1: 16 tokens, 2 heads
    assert f["attention"] == win + glob
    assert f["qkv"] == 2 * (2 * n * c * 3 * c)
    assert f["neck"] == 2 * n * c * 256 + 2 * n * 9 * 256 * 256
    # at 512² (1024 tokens) the global block's linear attention is far cheaper, while a window of 4 tokens
    # (N < head dim) costs more linearized: why blocks="global" is the default
    t512, s512 = model_flops(teacher, 512)["per_block"], model_flops(every, 512)["per_block"]
    assert s512[1]["attention"] * 4 < t512[1]["attention"]
    assert s512[0]["attention"] > t512[0]["attention"]
    padded = model_flops(teacher, 80)  # 5×5 grid, windows of 2 on the zero-padded 6×6 grid
    assert padded["per_block"][0]["qkv"] == 2 * 36 * c * 3 * c and padded["tokens"] == 25


def test_bench_rows_with_flop_bound():
    kw = TINY | {"pretrained": False}
    record = bench("timm:samvit_base_patch16", ["linear-elu"], resolutions=[64], repeats=1, warmup=0,
                   teacher_kwargs=kw, options={"blocks": "all"}, memory=False)
    (c,) = record["comparisons"]
    assert record["models"][1]["block_kinds"] == ["linear-elu", "linear-elu"]
    assert c["flop_bound"] == pytest.approx(record["results"][0]["flops"] / record["results"][1]["flops"])


def test_alias_resolves_and_fails_offline_in_one_line(monkeypatch):
    import socket

    t = adala.load_teacher("sam-b16", pretrained=False, **TINY)
    assert isinstance(t, VisionTransformerSAM) and t.adala_config["teacher"] == "timm:samvit_base_patch16.sa1b"

    def no_dns(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(OfflineError, match="could not fetch pretrained weights for timm:samvit_base_patch16.sa1b"):
        adala.load_teacher("sam-b16")
