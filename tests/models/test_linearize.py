"""linearize on every supported timm family: weights kept, structure kept, softmax swap exact."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_teacher
from timm.models.vision_transformer import VisionTransformer

import adala
from adala.attention.base import KernelAttention
from adala.errors import UnsupportedModelError

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8}),
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 28}),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", {"img_size": 28}),
    "clip": ("vit_base_patch16_clip_224", {"img_size": 32, "patch_size": 8}),
    "siglip": ("vit_base_patch16_siglip_224", {"img_size": 32, "patch_size": 8}),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    arch, kw = FAMILIES[request.param]
    return request.param, tiny_teacher(arch, **kw)


def test_linearize_keeps_every_pretrained_tensor(family):
    name, teacher = family
    student = adala.linearize(teacher, "linear-elu")
    assert isinstance(student, VisionTransformer)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert set(t_sd) == set(s_sd), name
    assert all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters())
    assert all(isinstance(b.attn, KernelAttention) and b.attn.kind == "linear-elu" for b in student.blocks)
    # the teacher itself is untouched
    assert not any(isinstance(b.attn, KernelAttention) for b in teacher.blocks)


def test_softmax_swap_is_bit_exact(family):
    name, teacher = family
    student = adala.linearize(teacher, "softmax")
    size = teacher.patch_embed.patch_size[0] * 3
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(teacher.forward_features(x), student.forward_features(x)), name
        assert torch.equal(teacher(x), student(x)), name


def test_linear_student_keeps_forward_api_and_dynamic_size(family):
    name, teacher = family
    student = adala.linearize(teacher, "linear-relu").eval()
    p = teacher.patch_embed.patch_size[0]
    with torch.no_grad():
        for hw in [(p * 2, p * 2), (p * 5, p * 3)]:
            feats = student.forward_features(torch.randn(1, 3, *hw))
            n = hw[0] // p * hw[1] // p + teacher.num_prefix_tokens
            assert feats.shape == (1, n, teacher.embed_dim), name
            assert torch.isfinite(student.forward_head(feats)).all()


def test_siglip_pool_head_stays_softmax():
    arch, kw = FAMILIES["siglip"]
    student = adala.linearize(tiny_teacher(arch, **kw))
    assert student.attn_pool is not None and not isinstance(student.attn_pool, KernelAttention)


def test_keep_softmax_blocks_and_range_check():
    teacher = tiny_teacher(depth=3)
    student = adala.linearize(teacher, "linear-elu", keep_softmax=[1])
    assert [b.attn.kind for b in student.blocks] == ["linear-elu", "softmax", "linear-elu"]
    assert student.adala_config["attention"]["blocks"] == ["linear-elu", "softmax", "linear-elu"]
    with pytest.raises(UnsupportedModelError, match="out of range"):
        adala.linearize(teacher, keep_softmax=[3])


def test_unsupported_architecture_names_what_is_supported():
    import timm

    model = timm.create_model("resnet18", pretrained=False)
    model.adala_config = {}
    with pytest.raises(UnsupportedModelError, match="supported: timm VisionTransformer"):
        adala.linearize(model)


def test_linearize_returns_a_trainable_model():
    """Teachers come frozen; the student is trainable like a fresh timm model, and the teacher stays frozen."""
    teacher = tiny_teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    student = adala.linearize(teacher, "linear-elu").train()
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    loss = student.forward_features(torch.randn(2, 3, 56, 56)).square().mean()
    loss.backward()  # a user's own loop: every block gets a gradient
    assert all(p.grad is not None for p in student.blocks[-1].parameters())


def test_stage_one_still_trains_only_the_attention():
    from adala.stages.align_attention import trainable_attention_params

    student = adala.linearize(tiny_teacher(), "linear-elu")
    names = set(trainable_attention_params(student, "attention"))
    got = {n for n, p in student.named_parameters() if p.requires_grad}
    assert got == names and all(".attn." in n and ".proj." not in n for n in got)
