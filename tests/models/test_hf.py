"""Hugging Face backbones become the equivalent timm ViT: same features, same parameters, every adala path."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
import torch
import transformers as tf
from timm.models.vision_transformer import VisionTransformer

import adala
from adala.errors import ConfigError, OfflineError, UnsupportedModelError
from adala.models import hf
from adala.models.surgery import block_kinds

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
# family -> (build the HF model, HF tensors with no timm counterpart, HF values folded into others)
FAMILIES = {
    "dinov2": (lambda: tf.Dinov2Model(tf.Dinov2Config(**TINY, mlp_ratio=2)), ["embeddings.mask_token"], 0),
    "dinov2-swiglu": (lambda: tf.Dinov2Model(tf.Dinov2Config(**TINY, use_swiglu_ffn=True)),
                      ["embeddings.mask_token"], 0),
    # the class-token position is added into cls_token (timm's no_embed_class layout)
    "dinov2-reg": (lambda: tf.Dinov2WithRegistersModel(
        tf.Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, num_register_tokens=2)), ["embeddings.mask_token"], 64),
    "vit": (lambda: tf.ViTModel(tf.ViTConfig(**TINY, intermediate_size=128)),
            ["pooler.dense.weight", "pooler.dense.bias"], 0),
    "clip": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY, intermediate_size=128)), [], 0),
    "siglip": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, intermediate_size=128)), [], 0),
}


def _tiny(family: str) -> torch.nn.Module:
    """A tiny HF model with every tensor moved off its init (zero biases, unit LayerScale would hide bad maps)."""
    model = FAMILIES[family][0]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_features(model, x: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF's tokens in timm's forward_features meaning (after the final norm), and its pooled output."""
    kw = {} if family.startswith("dinov2") else {"interpolate_pos_encoding": True}
    out = model(pixel_values=x, **kw)
    tokens = out.last_hidden_state
    if family == "clip":  # HF CLIP normalises only the pooled token; timm's norm covers all tokens
        tokens = model.post_layernorm(tokens)
    return tokens, out.pooler_output if family in ("clip", "siglip") else None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_model_matches_hf(family):
    model = _tiny(family)
    vit = hf.from_hf(model)
    assert isinstance(vit, VisionTransformer) and not vit.training
    for size in [(32, 32), (32, 48)]:  # native, then resampled positions (non-square: H/W order matters)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref, pooled = _hf_features(model, x, family)
            ours = vit.forward_features(x)
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() <= 1e-5, (family, size)
            if pooled is not None:
                assert (vit.forward_head(ours) - pooled).abs().max().item() <= 1e-5, (family, size)

    _, dropped, folded = FAMILIES[family]
    sd = model.state_dict()
    n_hf = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in vit.parameters()) == n_hf - sum(sd[k].numel() for k in dropped) - folded

    cfg = vit.adala_config
    assert cfg["teacher"] == f"hf:{type(model).__name__}"
    assert cfg["pos_embed_antialias"] is (family == "dinov2-reg")
    assert json.loads(json.dumps(cfg["timm_kwargs"])) == cfg["timm_kwargs"]


def test_layer_norm_eps_is_carried_in_the_config():
    vit = hf.from_hf(_tiny("vit"))  # HF ViT uses eps 1e-12, timm's default is 1e-6
    assert vit.adala_config["layer_norm_eps"] == 1e-12 and "norm_layer" not in vit.adala_config["timm_kwargs"]
    assert vit.norm.eps == vit.blocks[0].norm1.eps == 1e-12
    clip = hf.from_hf(_tiny("clip"))
    assert clip.norm_pre.eps == 1e-5


def test_mlp_ratio_gives_timm_the_exact_hidden_width():
    widths = [(64, 128), (384, 1536), (1152, 4304), (1536, 8192), (1280, 5120), (1664, 8192), (768, 3072)]
    widths += [(d, h) for d in range(24, 2048, 40) for h in (d * 4 - 8, int(d * 8 / 3), d * 3 + 7)]
    for dim, hidden in widths:
        assert int(dim * hf._mlp_ratio(dim, hidden)) == hidden, (dim, hidden)


def _old_names(sd: dict, prefix: str = "") -> dict:
    """transformers 4 key names, as older checkpoints and conversions carry them."""
    subs = [(r"^layers\.", "encoder.layer."), (r"attention\.([qkv])_proj", lambda m: "attention.attention." +
             {"q": "query", "k": "key", "v": "value"}[m[1]]), (r"attention\.o_proj", "attention.output.dense"),
            (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense")]
    out = {}
    for k, v in sd.items():
        for pat, rep in subs:
            k = re.sub(pat, rep, k)
        out[prefix + k] = v
    return out


@pytest.mark.parametrize("family, prefix", [("vit", "vit."), ("dinov2", ""), ("clip", "vision_model.")])
def test_older_transformers_names_map_the_same(family, prefix):
    model = _tiny(family)
    vit = hf.from_hf(model)
    sd = model.state_dict()
    old = _old_names(sd, prefix) if family != "clip" else {prefix + k: v for k, v in sd.items()}
    assert old.keys() != sd.keys()
    new = hf.checkpoint_filter_fn(old, vit)
    assert new.keys() == vit.state_dict().keys()
    assert all(torch.equal(new[k], v) for k, v in vit.state_dict().items())


def test_linearize_keeps_a_hf_model_and_rejects_other_hf_classes():
    model = _tiny("dinov2")
    student = adala.linearize(model)  # HF stays HF (tests/test_hf_attention.py); to_timm is the explicit bridge
    assert type(student) is tf.Dinov2Model and student.config._attn_implementation == "adala-linear-elu"
    timm_student = adala.linearize(hf.to_timm(model))
    assert isinstance(timm_student, VisionTransformer)
    assert block_kinds(timm_student) == ["linear-elu", "linear-elu"]
    assert timm_student.adala_config["attention"]["kind"] == "linear-elu"
    with torch.no_grad():
        assert timm_student.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 17, 64)

    bert = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported Hugging Face model BertModel") as err:
        adala.linearize(bert)
    msg = str(err.value)
    assert "\n" not in msg and all(c in msg for c in ("Dinov2Model", "ViTModel", "CLIPVisionModel",
                                                      "SiglipVisionModel"))


def test_multimodal_wrapper_converts_its_vision_tower():
    vision = tf.CLIPVisionConfig(**TINY, intermediate_size=128)
    text = tf.CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=50)
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    vit = hf.from_hf(model)
    assert vit.adala_config["teacher"] == "hf:CLIPModel"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.vision_model.post_layernorm(model.vision_model(pixel_values=x).last_hidden_state)
        assert (vit.forward_features(x) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["vit", "siglip", "dinov2-reg"])
def test_save_load_round_trip(family, tmp_path):
    vit = hf.from_hf(_tiny(family))
    adala.save_model(vit, tmp_path / "m")
    back = adala.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 40, 32)
    with torch.no_grad():
        assert torch.equal(back.forward_features(x), vit.forward_features(x))
        assert torch.equal(back.forward_head(back.forward_features(x)), vit.forward_head(vit.forward_features(x)))
    assert back.adala_config["teacher"] == vit.adala_config["teacher"]


def test_saved_hf_vit_keeps_its_layernorm_eps(tmp_path):
    vit = hf.from_hf(_tiny("vit"))  # HF ViT uses eps 1e-12, timm's default is 1e-6
    adala.save_model(vit, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "adala.json").read_text())["layer_norm_eps"] == 1e-12
    back = adala.load_model(tmp_path / "m")
    assert back.norm.eps == 1e-12 and back.blocks[0].norm1.eps == 1e-12


def _no_network(monkeypatch):
    def no_dns(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def test_load_teacher_from_a_save_pretrained_directory_offline(tmp_path, monkeypatch):
    model = _tiny("siglip")
    model.save_pretrained(tmp_path / "siglip")
    assert (tmp_path / "siglip" / "model.safetensors").is_file()
    (tmp_path / "siglip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    _no_network(monkeypatch)
    spec = f"hf:{tmp_path / 'siglip'}"
    teacher = adala.load_teacher(spec)
    assert isinstance(teacher, VisionTransformer) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    cfg = teacher.adala_config
    assert cfg["teacher"] == spec and cfg["mean"] == [0.1, 0.2, 0.3] and cfg["std"] == [0.4, 0.5, 0.6]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (teacher.forward_features(x) - model(pixel_values=x).last_hidden_state).abs().max().item() <= 1e-5
    random = adala.load_teacher(spec, pretrained=False)  # same architecture from config.json, fresh weights
    assert random.state_dict().keys() == teacher.state_dict().keys()
    assert not torch.equal(random.pos_embed, teacher.pos_embed)
    with pytest.raises(ConfigError, match="takes no timm options"):
        adala.load_teacher(spec, img_size=64)


def test_hub_name_fails_fast_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    _no_network(monkeypatch)
    start = time.monotonic()
    with pytest.raises(OfflineError, match="could not fetch hf:facebook/dinov2-small") as err:
        adala.load_teacher("hf:facebook/dinov2-small")
    assert time.monotonic() - start < 20  # no minute of retries
    assert "\n" not in str(err.value)
