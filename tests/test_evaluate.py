"""Scores from hand-built confusion cases, fidelity sanity, and ``evaluate`` input checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import adala
from adala.errors import ConfigError
from adala.evaluate import evaluate, fidelity
from adala.evaluate.metrics import ConfusionMatrix, classification_scores, segmentation_scores
from adala.stages.heads import task_config, wrap


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
    with pytest.raises(ConfigError, match="needs a teacher"):
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
