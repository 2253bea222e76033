"""Hugging Face models keep their class and API under adala.linearize: linear attention through transformers'
own AttentionInterface, equal to the timm student and to the float64 reference; save_hf round trips."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import adala
from adala.attention.naive import linear_attention_reference
from adala.errors import ConfigError, UnknownAttentionError, UnsupportedModelError
from adala.models import block_kinds, hf, hf_attention

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
DINO = {**TINY, "image_size": 28, "patch_size": 14}
FAMILIES = {
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**DINO)),
    "dinov2-reg": lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2)),
    "vit": lambda: tf.ViTModel(tf.ViTConfig(**TINY, image_size=32, patch_size=8)),
    "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY, image_size=32, patch_size=8)),
    "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8)),
}
REFERENCE = "adala-test-float64-reference"


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor moved off its init (zero biases and unit LayerScale would hide a wrong map)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Independent of adala.attention.ops: ELU+1 and the explicit N×N float64 matrix."""
    assert attention_mask is None

    def phi(t):
        return F.elu(t.double()) + 1

    out = linear_attention_reference(phi(query), phi(key), value)
    return out.to(value.dtype).transpose(1, 2).contiguous(), None


@pytest.fixture(autouse=True)
def reference_impl(monkeypatch):
    monkeypatch.setitem(AttentionInterface._global_mapping, REFERENCE, _reference_attention)


def _on_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a linearized HF model that runs the float64 reference in every adala attention."""
    ref = copy.deepcopy(model)
    configs = {id(m.config): m.config for m in hf_attention.attention_modules(ref)}  # often one, shared
    for config in configs.values():
        assert config._attn_implementation == "adala-linear-elu"
        config._attn_implementation = REFERENCE
    return ref


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_model_keeps_its_class_and_equals_the_timm_student(family):
    teacher = _perturbed(FAMILIES[family]())
    student = adala.linearize(teacher)
    assert type(student) is type(teacher) and student is not teacher
    assert teacher.config._attn_implementation != "adala-linear-elu"  # the teacher is untouched
    assert hf_attention.kinds_of(student) == ["linear-elu"] * 2
    timm_student = adala.linearize(hf.to_timm(teacher))
    ref = _on_reference(student)
    size = teacher.config.image_size
    for shape in [(size, size), (size, size + teacher.config.patch_size)]:  # native, then resampled positions
        x = torch.randn(2, 3, *shape)
        with torch.no_grad():
            ours = hf.hf_tokens(student, x)
            assert _max_err(ours, timm_student.forward_features(x)) <= 1e-5, (family, shape)
            assert _max_err(ours, hf.hf_tokens(ref, x)) <= 1e-5, (family, shape)
            assert _max_err(ours, hf.hf_tokens(teacher, x)) > 1e-2  # linear attention really ran
    if family in ("clip", "siglip"):  # pooled output: CLIP's class token, SigLIP's (softmax) MAP head
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            pooled = student(pixel_values=x).pooler_output
            assert _max_err(pooled, timm_student.forward_head(timm_student.forward_features(x))) <= 1e-5


def test_dinov2_pixel_values_api_outputs_and_training():
    teacher = _perturbed(tf.Dinov2Model(tf.Dinov2Config(**DINO)))
    student = adala.linearize(teacher, attention="linear-relu")
    x = torch.randn(1, 3, 28, 28)
    out = student(pixel_values=x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 5, 32) and out.pooler_output.shape == (1, 32)
    assert len(out.hidden_states) == 3
    timm_student = adala.linearize(hf.to_timm(teacher), attention="linear-relu")
    with torch.no_grad():
        assert _max_err(out.last_hidden_state, timm_student.forward_features(x)) <= 1e-5
    student.train()
    student(pixel_values=x).last_hidden_state.square().mean().backward()  # trainable as it was
    assert student.embeddings.patch_embeddings.projection.weight.grad is not None


def test_keep_softmax_blocks_match_the_timm_hybrid():
    teacher = _perturbed(tf.Dinov2Model(tf.Dinov2Config(**DINO)))
    student = adala.linearize(teacher, keep_softmax=[0])
    assert hf_attention.kinds_of(student) == ["softmax", "linear-elu"]
    timm_student = adala.linearize(hf.to_timm(teacher), keep_softmax=[0])
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert _max_err(student(pixel_values=x).last_hidden_state, timm_student.forward_features(x)) <= 1e-5
    assert block_kinds(hf.to_timm(student)) == ["softmax", "linear-elu"]


def _depth_anything() -> torch.nn.Module:
    backbone = tf.Dinov2Config(**{**DINO, "num_hidden_layers": 4}, out_indices=[1, 2, 3, 4],
                               reshape_hidden_states=False)
    config = tf.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                    neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    return _perturbed(tf.DepthAnythingForDepthEstimation(config))


def test_depth_anything_runs_linear_attention_in_its_dinov2_backbone(tmp_path):
    teacher = _depth_anything()
    student = adala.linearize(teacher)
    assert type(student) is tf.DepthAnythingForDepthEstimation
    assert type(student.backbone) is tf.Dinov2Backbone
    assert hf_attention.kinds_of(student) == ["linear-elu"] * 4
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        depth = student(pixel_values=x).predicted_depth
        assert depth.shape == (2, 28, 42)
        assert _max_err(depth, _on_reference(student)(pixel_values=x).predicted_depth) <= 1e-4
        assert _max_err(depth, teacher(pixel_values=x).predicted_depth) > 1e-3
        # the Dinov2Backbone alone, against the timm student on the same weights
        maps = student.backbone(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        dinov2 = tf.Dinov2Model(teacher.config.backbone_config).eval()
        missing, unexpected = dinov2.load_state_dict(teacher.backbone.state_dict(), strict=False)
        assert not missing and not unexpected
        timm_student = adala.linearize(hf.to_timm(dinov2))
        assert _max_err(student.backbone.layernorm(maps), timm_student.forward_features(x)) <= 1e-5
    student.save_pretrained(tmp_path / "depth")  # a composite config: the backbone's implementation survives
    back = tf.DepthAnythingForDepthEstimation.from_pretrained(tmp_path / "depth")
    assert hf_attention.kinds_of(back) == ["linear-elu"] * 4
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).predicted_depth, depth)


@pytest.mark.skipif(not hasattr(tf, "DINOv3ViTModel"), reason="this transformers has no DINOv3 ViT")
def test_dinov3_vit_runs_linear_attention():
    config = tf.DINOv3ViTConfig(**TINY, image_size=32, patch_size=16, num_register_tokens=2)
    teacher = _perturbed(tf.DINOv3ViTModel(config))
    student = adala.linearize(teacher)
    assert type(student) is tf.DINOv3ViTModel and hf_attention.kinds_of(student) == ["linear-elu"] * 2
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ours = student(pixel_values=x).last_hidden_state
        assert ours.shape == (2, 1 + 2 + 6, 32)
        assert _max_err(ours, _on_reference(student)(pixel_values=x).last_hidden_state) <= 1e-5
        assert _max_err(ours, teacher(pixel_values=x).last_hidden_state) > 1e-2


def test_multimodal_wrapper_switches_only_its_vision_tower(tmp_path):
    vision = tf.CLIPVisionConfig(**TINY, image_size=32, patch_size=8)
    text = tf.CLIPTextConfig(**TINY, vocab_size=50)
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    student = adala.linearize(model)
    assert type(student) is tf.CLIPModel
    assert student.config.vision_config._attn_implementation == "adala-linear-elu"
    assert student.config.text_config._attn_implementation != "adala-linear-elu"  # causal text stays softmax
    assert student.config.attn_implementation == {"vision_config": "adala-linear-elu"}  # survives save_pretrained
    ids, x = torch.randint(0, 50, (1, 5)), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out, ref = student(input_ids=ids, pixel_values=x), model(input_ids=ids, pixel_values=x)
    assert torch.equal(out.text_embeds, ref.text_embeds)
    assert _max_err(out.image_embeds, ref.image_embeds) > 1e-3
    student.save_pretrained(tmp_path / "clip")
    back = tf.CLIPModel.from_pretrained(tmp_path / "clip")
    assert back.config.vision_config._attn_implementation == "adala-linear-elu"
    assert back.config.text_config._attn_implementation == model.config.text_config._attn_implementation


def test_errors_are_one_line():
    model = tf.Dinov2Model(tf.Dinov2Config(**DINO)).eval()
    with pytest.raises(UnsupportedModelError, match="needs adala modules inside the layers") as err:
        adala.linearize(model, attention="hedgehog")
    assert "to_timm" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnknownAttentionError, match="unknown attention kind 'nope'"):
        adala.linearize(model, attention="nope")
    with pytest.raises(ConfigError, match="takes no options"):
        adala.linearize(model, eps=1e-3)
    assert hf_attention.kinds_of(adala.linearize(model, eps=1e-6, kernel="torch")) == ["linear-elu"] * 2
    with pytest.raises(UnsupportedModelError, match="out of range"):
        adala.linearize(model, keep_softmax=[5])
    bert = tf.BertModel(tf.BertConfig(**TINY, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported Hugging Face model BertModel"):
        adala.linearize(bert)
    student = adala.linearize(model)
    with pytest.raises(UnsupportedModelError, match="takes no attention mask"):
        attn = hf_attention.attention_modules(student)[0]
        q = torch.randn(1, 2, 5, 16)
        ALL_ATTENTION_FUNCTIONS["adala-linear-elu"](attn, q, q, q, torch.zeros(1, 1, 5, 5))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_round_trip(family, tmp_path):
    teacher = _perturbed(FAMILIES[family]())
    student = adala.linearize(hf.to_timm(teacher))  # what the stages train
    out = hf.save_hf(student, tmp_path / "hf", like=teacher)
    saved = json.loads((out / "config.json").read_text())
    assert saved["attn_implementation"] == "adala-linear-elu"
    back = tf.AutoModel.from_pretrained(out)  # the implementation comes from config.json
    explicit = tf.AutoModel.from_pretrained(out, attn_implementation="adala-linear-elu")
    assert type(back) is type(teacher) and not back.training
    assert hf_attention.kinds_of(back) == ["linear-elu"] * 2
    x = torch.randn(2, 3, teacher.config.image_size, teacher.config.image_size)
    with torch.no_grad():
        tokens = student.forward_features(x)
        assert _max_err(hf.hf_tokens(back, x), tokens) <= 1e-5
        assert torch.equal(hf.hf_tokens(explicit, x), hf.hf_tokens(back, x))
        if family in ("clip", "siglip"):
            assert _max_err(back(pixel_values=x).pooler_output, student.forward_head(tokens)) <= 1e-5
    timm_again = hf.to_timm(back)  # and back to timm layout: the same linear student
    assert block_kinds(timm_again) == ["linear-elu"] * 2
    adala.save_model(timm_again, tmp_path / "timm")
    with torch.no_grad():
        assert _max_err(adala.load_model(tmp_path / "timm").forward_features(x), tokens) <= 1e-5


def test_save_hf_refuses_what_it_cannot_write(tmp_path):
    teacher = _perturbed(tf.Dinov2Model(tf.Dinov2Config(**DINO)))
    hybrid = adala.linearize(hf.to_timm(teacher), keep_softmax=[0])
    with pytest.raises(UnsupportedModelError, match="save it with adala.save_model"):
        hf.save_hf(hybrid, tmp_path / "x", like=teacher)
    with pytest.raises(UnsupportedModelError, match="pass like= with the teacher's architecture"):
        hf.save_hf(adala.linearize(hf.to_timm(teacher)), tmp_path / "x",
                   like=tf.Dinov2Config(**{**DINO, "hidden_size": 64}))
    timm_teacher = adala.linearize(hf.to_timm(teacher))
    timm_teacher.adala_config["teacher"] = "dinov2-s14"
    with pytest.raises(ConfigError, match="needs like="):
        hf.save_hf(timm_teacher, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_linear_hf_model_save_pretrained_reloads_linear_and_fails_loudly_without_adala(tmp_path, monkeypatch):
    student = adala.linearize(_perturbed(tf.Dinov2Model(tf.Dinov2Config(**DINO))))
    student.save_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 28, 28)
    back = tf.AutoModel.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).last_hidden_state, student(pixel_values=x).last_hidden_state)
    adala.linearize(back).save_pretrained(tmp_path / "again")  # a reloaded model records it again
    assert json.loads((tmp_path / "again" / "config.json").read_text())["attn_implementation"] == "adala-linear-elu"
    with pytest.raises(UnsupportedModelError, match="runs softmax by itself"):
        adala.linearize(back, attention="softmax")
    monkeypatch.delitem(AttentionInterface._global_mapping, "adala-linear-elu")  # as if adala were not imported
    with pytest.raises(ValueError, match="adala-linear-elu"):
        tf.AutoModel.from_pretrained(tmp_path / "m")


def test_import_adala_registers_before_transformers_is_imported(tmp_path, one_thread):
    """The subprocess runs on one thread (OMP_NUM_THREADS=1), and so does the reference here: bitwise equality."""
    student = adala.linearize(_perturbed(tf.Dinov2Model(tf.Dinov2Config(**DINO))))
    student.save_pretrained(tmp_path / "m")
    x = torch.randn(1, 3, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(student(pixel_values=x).last_hidden_state, tmp_path / "y.pt")
    code = (
        "import sys, torch, adala\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'm')!r}, attn_implementation='adala-linear-elu')\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(pixel_values=x).last_hidden_state, y)\n"
    )
    src = str(Path(adala.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
