"""Scores from hand-built confusion cases, fidelity sanity, and ``evaluate`` input checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import adala
from adala.data import build_dataset
from adala.errors import ConfigError
from adala.evaluation import evaluate, fidelity
from adala.evaluation.metrics import ConfusionMatrix, classification_scores, segmentation_scores
from adala.models.heads import task_config, wrap


def _tiny(**kw):
    args = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2, **kw}
    return adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, **args)


def test_top1_and_per_class_accuracy_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0]))
    # rows = truth: class0 -> [0, 2] (1 right of 2), class1 -> [0, 1] (1 of 2), class2 -> [2, 2] (2 of 2)
    assert cm.top1() == pytest.approx(4 / 6)
    assert cm.per_class_accuracy() == pytest.approx([0.5, 0.5, 1.0])
    s = classification_scores(cm, ["a", "b", "c"])
    assert s["per_class_accuracy"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    assert s["num_images"] == 6


def test_miou_by_hand_with_ignore_and_absent_class():
    cm = ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 3, 0, 2]])
    cm.update(pred, target)
    # class 0: tp1, fp0, fn1 -> 1/2; class 1: tp2, fp1 (pixel 0,1), fn1 (pixel 1,0) -> 2/4;
    # class 2: tp1, fp1 -> 1/2; class 3: never true, predicted only on ignored pixels -> absent (NaN).
    iou = cm.iou()
    assert iou[:3] == pytest.approx([0.5, 0.5, 0.5])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx(0.5)
    assert cm.total == 6
    s = segmentation_scores(cm, ["bg", "x", "y", "z"])
    assert s["per_class_iou"]["z"] is None and s["miou"] == pytest.approx(0.5)


def test_perfect_and_wrong_predictions():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    assert cm.top1() == 1.0 and cm.miou() == 1.0
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 0]), torch.tensor([0, 1]))
    assert cm.top1() == 0.0 and cm.miou() == 0.0


def test_fidelity_of_exact_swap_is_perfect_and_linear_is_not():
    t = _tiny()
    x = torch.randn(2, 3, 56, 56)
    same = fidelity(adala.linearize(t, "softmax"), t, [x])
    assert same["attn_rel_err_mean"] < 1e-5 and same["final_cosine"] > 0.99999
    lin = fidelity(adala.linearize(t, "linear-elu"), t, [x])
    assert lin["attn_rel_err_mean"] > 1e-3 and len(lin["attn_rel_err"]) == 2 and lin["num_images"] == 2


def test_evaluate_needs_a_head_and_a_teacher_for_features(tmp_path):
    t = _tiny()
    with pytest.raises(ConfigError, match="classification head"):
        evaluate(t, task="classification", data="fashion-mnist:test", img_size=56, length=4)
    with pytest.raises(ConfigError, match="needs one"):
        evaluate(t, task="features", data="photos:heldout", img_size=56)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        evaluate(t, task="features", data="photos:heldout", img_size=50, teacher=t)
    assert not any(tmp_path.iterdir())


def test_evaluate_classification_writes_json(tmp_path):
    t = _tiny()
    model = wrap(adala.linearize(t), task_config("classification", 10, "linear"))
    out = tmp_path / "scores.json"
    res = evaluate(model, task="classification", data="fashion-mnist:test", img_size=56, length=8,
                   teacher=t, batch_size=4, out=out)
    saved = json.loads(out.read_text())
    assert saved["num_images"] == 8 and 0.0 <= saved["top1"] <= 1.0
    assert saved["top1"] == pytest.approx(res["top1"])
    assert 0.0 < saved["fidelity"]["final_cosine"] <= 1.0
    res = evaluate(model, task="features", data="photos:heldout", img_size=56, length=4, teacher=t,
                   out=tmp_path / "d")
    assert (tmp_path / "d" / "eval.json").is_file() and "top1" not in res


# ---------------------------------------------------------------- structure agreement and correspondence
def _permuted_patches(teacher: torch.nn.Module) -> torch.nn.Module:
    """A 'student' that returns the teacher's tokens with the patch tokens shuffled: every token is still a
    teacher token (per-token statistics intact), but which patch is where is lost."""
    import copy

    model = copy.deepcopy(teacher)
    inner = model.forward_features
    p = model.num_prefix_tokens

    def forward_features(x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        perm = torch.randperm(out.shape[1] - p, generator=torch.Generator().manual_seed(1))
        return torch.cat([out[:, :p], out[:, p:][:, perm]], 1)

    model.forward_features = forward_features
    return model


def test_structure_agreement_by_hand():
    from adala.evaluation.fidelity import structure_agreement

    # 1-D points on a line: each point's 2 nearest (cosine on 2-D unit vectors at angles) are its neighbours
    ang = torch.linspace(0, 1.5, 8)
    pts = torch.stack([ang.cos(), ang.sin()], -1)
    assert structure_agreement(pts, pts, k=2) == pytest.approx(1.0)
    # reversing a line keeps every neighbourhood ({i-1, i+1} either way); a random shuffle of random
    # features does not: overlap near the chance level k/(N-1)
    assert structure_agreement(pts.flip(0), pts, k=2) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 16, generator=g)
    shuffled = structure_agreement(feats[torch.randperm(64, generator=g)], feats, k=5)
    assert shuffled < 0.25
    # a scaled copy has the same cosine neighbourhoods
    assert structure_agreement(3 * pts, pts, k=2) == pytest.approx(1.0)


def test_teacher_scores_one_and_permuted_student_scores_low(embedded_teacher):
    from adala.evaluation.correspondence import correspondence
    from adala.evaluation.fidelity import FidelityMeter

    t = embedded_teacher
    ds = build_dataset("photos:heldout", task="unlabeled", img_size=112, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225), train=False)
    x = torch.stack([ds[i] for i in range(3)])
    with torch.no_grad():
        tt = t.forward_features(x)
        perm = _permuted_patches(t).forward_features(x)
    same, shuffled = FidelityMeter(1), FidelityMeter(1)
    same.add_tokens(tt, tt, 1)
    shuffled.add_tokens(perm, tt, 1)
    a, b = same.result(), shuffled.result()
    assert a["final_cosine"] == pytest.approx(1.0) and a["structure_k10"] == pytest.approx(1.0)
    assert a["cls_cosine"] == pytest.approx(1.0)
    assert b["cls_cosine"] == pytest.approx(1.0)  # the CLS token is untouched by the shuffle
    assert b["structure_k10"] < 0.2 and b["final_cosine"] < 0.8

    from adala.data.photos import _image_tensor, pool_sources

    images = [_image_tensor(p) for _, p in pool_sources("photos", True)[:3]]
    acc = correspondence({"teacher": t, "again": t, "permuted": _permuted_patches(t)}, images, 112,
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert acc["again"] == acc["teacher"] > 0.2
    assert acc["permuted"] < 0.5 * acc["teacher"]
    smooth = acc["adjacent_cosine"]  # a shuffled grid loses the teacher's neighbour similarity
    assert smooth["again"] == smooth["teacher"] and smooth["permuted"] < smooth["teacher"] - 0.05


def test_match_accuracy_by_hand():
    from adala.evaluation.correspondence import match_accuracy

    grid = 4
    feats = torch.eye(grid * grid)  # every A patch unique
    # B = A itself (zoom 1, no offset): each B patch matches the same A patch -> all correct
    assert match_accuracy(feats, feats, grid, (0.0, 0.0, 1.0)) == (16, 16)
    # B's patches all look like A's patch 0: only B patches whose true location is within one patch of it
    ok, n = match_accuracy(feats, feats[[0] * 16], grid, (0.0, 0.0, 1.0))
    assert (ok, n) == (4, 16)  # B patches (0,0), (0,1), (1,0), (1,1)


def test_adjacent_cosine_by_hand():
    from adala.evaluation.correspondence import adjacent_cosine

    v = torch.tensor([1.0, 2.0, 0.5])
    assert adjacent_cosine(v.repeat(9, 1), 3) == pytest.approx(1.0)  # a constant map
    sign = torch.tensor([(-1.0) ** (i + j) for i in range(3) for j in range(3)]).unsqueeze(1)
    assert adjacent_cosine(sign * v, 3) == pytest.approx(-1.0)  # a checkerboard: every neighbour flips
    stripes = torch.tensor([[1.0, 0.0] if j % 2 else [0.0, 1.0] for i in range(3) for j in range(3)])
    assert adjacent_cosine(stripes, 3) == pytest.approx(0.5)  # 6 orthogonal right pairs, 6 equal lower pairs


def test_evaluate_several_sizes_and_correspondence(tmp_path):
    t = _tiny()
    s = adala.linearize(t, "linear-elu")
    res = evaluate(s, task="features", data="photos:heldout", img_size=[28, 56], teacher=t, length=2,
                   out=tmp_path / "f.json")
    assert set(res["by_size"]) == {"28", "56"}
    for r in res["by_size"].values():
        f = r["fidelity"]
        assert 0 <= f["structure_k10"] <= 1 and -1 <= f["cls_cosine"] <= 1 and f["num_images"] == 2
    assert json.loads((tmp_path / "f.json").read_text())["img_size"] == [28, 56]
    c = evaluate(s, task="correspondence", data="photos:heldout", img_size=56, teacher=t, length=2)
    assert c["num_pairs"] == 2 and 0 <= c["accuracy"] <= 1 and c["images"] == ["chelsea", "coffee"]
    assert -1 <= c["adjacent_cosine"] <= 1 and -1 <= c["teacher_adjacent_cosine"] <= 1
    with pytest.raises(ConfigError, match="photo collection"):
        evaluate(s, task="correspondence", data="fashion-mnist:test", img_size=56, teacher=t)


def test_evaluate_with_attention_options_changed_on_loading(tmp_path, capsys):
    """A trained student scored with other weight-free options (more agents): the model is rebuilt with them,
    its output changes, the result records them; options that change the weights fail in one line."""
    from adala.cli import main

    t = _tiny(init_values=0.3)  # layer scale large enough for attention to show in the output
    with torch.no_grad():
        for block in t.blocks:  # random q/k attend almost uniformly, where any agent count is exact
            block.attn.qkv.weight.mul_(4)
    s = adala.linearize(t, "agent", agents=2, dwc=3)
    adala.save_model(s, tmp_path / "s")
    x = torch.randn(1, 3, 56, 56)
    loaded = adala.load_model(tmp_path / "s", options={"agents": 3, "kmeans_points": 0})
    attn = loaded.blocks[0].attn
    assert (attn.agents, attn.kmeans_points, attn.dwc.kernel_size) == (3, 0, (3, 3))
    assert loaded.adala_config["attention"]["options"] == {"agents": 3, "dwc": 3, "kmeans_points": 0}
    with torch.no_grad():
        base, more = adala.load_model(tmp_path / "s").forward_features(x), loaded.forward_features(x)
        want = adala.linearize(t, "agent", agents=3, dwc=3, kmeans_points=0).forward_features(x)
    torch.testing.assert_close(more, want)  # the same model as linearized with those options
    assert (base - more).abs().max() > 1e-3  # 9 agents in place of 4 is another computation
    res = evaluate(tmp_path / "s", task="features", data="photos:heldout", img_size=[56], teacher=t, length=1,
                   options={"agents": 3})
    assert res["options"] == {"agents": 3} and res["by_size"]["56"]["fidelity"]["num_images"] == 1
    with pytest.raises(ConfigError, match=r"change the weights.*dwc"):
        adala.load_model(tmp_path / "s", options={"dwc": 5})
    with pytest.raises(ConfigError, match="not to a module"):
        evaluate(s, task="features", data="photos:heldout", teacher=t, options={"agents": 3})
    adala.save_model(t, tmp_path / "t")
    with pytest.raises(ConfigError, match="no linear attention"):
        adala.load_model(tmp_path / "t", options={"agents": 3})
    assert main(["evaluate", "--model", str(tmp_path / "s"), "--task", "features", "--data", "photos:heldout",
                 "--img-size", "56", "--teacher", "timm:vit_small_patch14_dinov2", "--length", "1",
                 "--option", "dwc=5"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "change the weights" in err[0], err
