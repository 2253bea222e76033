"""Shared by the family tests (test_eva, test_sam): sharpened random teachers, fixed-batch stage losses, and
the 10-step stage 1 + stage 2 + save/load round trip every family must pass."""

from __future__ import annotations

import torch

import adala
from adala.stages import align_attention, align_features

FAST = {"progress": False, "log_every": 1}


def sharpen(teacher: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Wider random q/k weights: timm's 0.02 init gives near-uniform softmax attention, which a linear student
    already matches to 1e-8, leaving stage 1 nothing to learn."""
    with torch.no_grad():
        for blk in teacher.blocks:
            a = blk.attn
            if a.qkv is not None:
                a.qkv.weight[: 2 * a.qkv.out_features // 3].normal_(0, std)  # the q and k rows
            else:
                a.q_proj.weight.normal_(0, std)
                a.k_proj.weight.normal_(0, std)
    return teacher


def heldout(size: int, n: int = 4) -> torch.Tensor:
    from adala.data import build_dataset

    ds = build_dataset("photos:heldout", task="unlabeled", img_size=size, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225), train=False, length=n)
    return torch.stack([ds[i] for i in range(n)])


def stage_losses(teacher, student, x) -> tuple[float, float]:
    """Stage 1's and stage 2's objectives on one fixed batch (per-step training losses see other batches)."""
    from adala.stages.align_attention import AttentionAlignment
    from adala.stages.align_features import FeatureAlignment

    s1 = AttentionAlignment(teacher, student)
    with torch.no_grad():
        a = s1(x)[0].item()
        b = FeatureAlignment(teacher, student)(x)[0].item()
    s1.recorder.remove()
    return a, b


def run_stages_and_round_trip(teacher, size: int, tmp_path, lr1: float = 3e-4, lr2: float = 1e-4,
                              train2: str = "all"):
    """10-step stage 1 then stage 2 (photos, batch 2): each lowers its own loss on a fixed held-out batch; the
    saved model reloads exactly. Small learning rates: Adam's first steps move every weight by about lr, which
    on a 64-wide random model outweighs what 20 images can teach."""
    x = heldout(size)
    s0 = adala.linearize(teacher, "linear-elu")
    before1, _ = stage_losses(teacher, s0, x)
    s1 = align_attention(teacher, data="photos", img_size=size, steps=10, batch_size=2, lr=lr1,
                         out=tmp_path / "s1", **FAST)
    after1, before2 = stage_losses(teacher, s1.model, x)
    assert after1 < before1, (before1, after1)
    s2 = align_features(teacher, s1.model, data="photos", img_size=size, steps=10, batch_size=2, lr=lr2,
                        trainable=train2, out=tmp_path / "s2", **FAST)
    _, after2 = stage_losses(teacher, s2.model, x)
    assert after2 < before2, (before2, after2)
    reloaded = adala.load_model(tmp_path / "s2")
    assert type(reloaded) is type(teacher)
    assert adala.models.block_kinds(reloaded) == adala.models.block_kinds(s2.model)
    a, b = reloaded.state_dict(), s2.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    return reloaded, s2.model.eval()
