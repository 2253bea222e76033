"""The embedded DINOv2-S/14 teacher: offline load, fidelity to the ONNX graph, real features, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adala
from adala.errors import CacheError, OfflineError, UnknownTeacherError
from adala.models import dinov2_onnx


def _photo(size: int = 224) -> np.ndarray:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((size, size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def _onnx_backbone(x: np.ndarray) -> np.ndarray:
    """The graph's own backbone output, run by onnxruntime: shares no code with our conversion."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(dinov2_onnx.onnx_path()))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], {"input_image": x})[0]


def test_embedded_teacher_matches_onnx_graph(embedded_teacher):
    x = _photo()
    ref = _onnx_backbone(x)
    with torch.no_grad():
        ours = embedded_teacher.forward_features(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (1, 257, 384)
    assert np.abs(ours - ref).max() < 1e-4


def test_embedded_teacher_is_frozen_timm_vit(embedded_teacher):
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(embedded_teacher, VisionTransformer) and not embedded_teacher.training
    assert not any(p.requires_grad for p in embedded_teacher.parameters())
    assert sum(p.numel() for p in embedded_teacher.parameters()) == 22_056_192
    with torch.no_grad():
        assert embedded_teacher.forward_features(torch.randn(1, 3, 98, 140)).shape == (1, 1 + 7 * 10, 384)


def _knn_accuracy(model, x_tr, y_tr, x_te, y_te, k: int = 5) -> float:
    with torch.no_grad():
        f_tr = torch.nn.functional.normalize(model.forward_features(x_tr)[:, 0], dim=-1)
        f_te = torch.nn.functional.normalize(model.forward_features(x_te)[:, 0], dim=-1)
    idx = (f_te @ f_tr.T).topk(k, dim=-1).indices
    pred = torch.mode(y_tr[idx], dim=-1).values
    return (pred == y_te).float().mean().item()


@pytest.mark.slow
def test_embedded_teacher_beats_random_vit_on_knn(embedded_teacher):
    from adala.data import build_dataset

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def load(split, n):
        ds = build_dataset(f"fashion-mnist:{split}", task="classification", img_size=56, mean=mean, std=std,
                           train=False, length=n)
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys)

    x_tr, y_tr = load("train", 300)
    x_te, y_te = load("test", 200)
    random_vit = adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=518)
    acc_teacher = _knn_accuracy(embedded_teacher, x_tr, y_tr, x_te, y_te)
    acc_random = _knn_accuracy(random_vit, x_tr, y_tr, x_te, y_te)
    assert acc_teacher > acc_random + 0.1, (acc_teacher, acc_random)


def test_cache_is_reused_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ADALA_CACHE", str(tmp_path))
    first = adala.load_teacher()
    cached = tmp_path / "teachers" / "dinov2-s14.safetensors"
    assert cached.is_file()
    calls = []
    real = dinov2_onnx.convert_onnx
    monkeypatch.setattr(dinov2_onnx, "convert_onnx", lambda *a: calls.append(1) or real(*a))
    adala.load_teacher()
    assert calls == []  # reused, not converted again
    with open(cached, "r+b") as f:  # corrupt the middle of the file
        f.seek(cached.stat().st_size // 2)
        f.write(b"\x00garbage\x00" * 64)
    again = adala.load_teacher()
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ADALA_CACHE", str(blocker / "cache"))
    with pytest.raises(CacheError, match="ADALA_CACHE"):
        adala.load_teacher()


def test_unknown_teacher_and_offline_hub():
    with pytest.raises(UnknownTeacherError, match="accepted: dinov2-s14"):
        adala.load_teacher("dinov3-giant")
    with pytest.raises(UnknownTeacherError, match="timm has no model"):
        adala.load_teacher("timm:not_a_real_model")


def test_timm_names_build_offline_with_pretrained_false():
    t = adala.load_teacher("timm:vit_large_patch14_dinov2.lvd142m", pretrained=False, img_size=28, depth=1)
    assert t.adala_config["teacher"] == "timm:vit_large_patch14_dinov2.lvd142m"
    assert t.embed_dim == 1024 and not t.adala_config["pos_embed_antialias"]


def test_hub_download_fails_cleanly_offline(monkeypatch):
    import socket

    def no_dns(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(OfflineError, match="could not fetch pretrained weights"):
        adala.load_teacher("timm:vit_tiny_patch16_224.augreg_in21k")
