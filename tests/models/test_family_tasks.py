"""Stage 3, evaluation and hybrids for the Eva and SAM families on tiny random variants: heads read what each
family's ``pooled_features`` / ``dense_features`` give (Eva: CLS + patch mean past the registers, RoPE at a
size the model was not built for; SAM: the neck's grid, no CLS), a 10-step fine-tune lowers its loss, the saved
task model reloads bit-exact with its head, ``evaluate`` scores it, and the keep-softmax hybrid picks among the
blocks the student linearized (SAM: its global blocks)."""

from __future__ import annotations

import json

import pytest
import torch
from family_helpers import FAST
from test_eva import tiny_eva
from test_sam import tiny_sam

import adala
from adala import hybrid
from adala.cli import main
from adala.errors import ConfigError
from adala.evaluation import evaluate
from adala.evaluation.correspondence import patch_tokens
from adala.models.families import family_of
from adala.models.surgery import block_kinds
from adala.stages import ClassificationModel, SegmentationModel, finetune

# family -> (teacher builder, fine-tune size): Eva is built for 64² and fine-tuned at 96² (its RoPE grid and
# patch grid follow the input); SAM at its 64² (4×4 grid: one global block, one of 2×2 windows)
FAMILIES = {"eva": (lambda: tiny_eva("dinov3"), 96), "sam": (tiny_sam, 64)}
CASES = [
    ("classification", "fashion-mnist", "linear", {}),
    ("linear-probe", "fashion-mnist", "linear", {}),
    ("segmentation", "fashion-mnist-seg", "linear", {}),
    ("segmentation", "fashion-mnist-seg", "linear4", {"freeze_backbone": True}),
]


@pytest.mark.parametrize("task,data,head,kw", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_finetune_lowers_its_loss_reloads_bit_exact_and_evaluates(tmp_path, name, task, data, head, kw):
    build, size = FAMILIES[name]
    student = adala.linearize(build())
    # 4 images in batches of 4: every step sees the same images, so the first and last losses compare
    res = finetune(student, task=task, data=data, img_size=size, length=4, batch_size=4, steps=10, lr=1e-3,
                   head=head, out=tmp_path / "ft", **kw, **FAST)
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 10 and losses[-1] < losses[0], losses
    model = res.model.eval()
    reloaded = adala.load_model(tmp_path / "ft")
    assert type(reloaded) is type(model) and type(reloaded.backbone) is type(student)
    a, b = reloaded.state_dict(), model.state_dict()
    assert set(a) == set(b) and any(k.startswith("head.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(reloaded(x), out)
    num_classes = model.adala_config["task"]["num_classes"]
    if task == "segmentation":
        assert out.shape == (2, num_classes, size, size)
    else:
        assert out.shape == (2, num_classes)
    assert block_kinds(reloaded.backbone) == block_kinds(student)
    scores = evaluate(reloaded, task=task, data=f"{data}:test", img_size=size, length=4, batch_size=4)
    key = "miou" if task == "segmentation" else "top1"
    assert 0.0 <= scores[key] <= 1.0


def test_head_features_follow_the_family():
    eva, sam = adala.linearize(tiny_eva("dinov3")), adala.linearize(tiny_sam())
    x = torch.randn(2, 3, 96, 64)  # non-square and not the size either was built for
    with torch.no_grad():
        tokens = eva.forward_features(x)  # (B, 1 CLS + 4 registers + 6·4 patches, 64)
        assert tokens.shape[1] == 5 + 24
        cls = ClassificationModel(eva, 3)
        assert cls.pool == "cls+mean" and cls.feature_dim == 128
        torch.testing.assert_close(cls.features(x), torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1))
        seg = SegmentationModel(eva, 3)
        grid = seg.features(x)
        assert grid.shape == (2, 64, 6, 4)
        assert torch.equal(grid[:, :, 1, 2], tokens[:, 5 + 1 * 4 + 2])  # row-major patches past the registers
        assert SegmentationModel(eva, 3, "linear4").features(x).shape == (2, 128, 6, 4)  # 2 blocks: 2 levels

        neck = sam.forward_features(x)  # (B, 256, 6, 4): no CLS, no tokens
        cls = ClassificationModel(sam, 3)
        assert cls.pool == "mean" and cls.feature_dim == 256
        torch.testing.assert_close(cls.features(x), neck.mean((2, 3)))
        assert torch.equal(SegmentationModel(sam, 3).features(x), neck)
        assert SegmentationModel(sam, 3, "linear4").features(x).shape == (2, 512, 6, 4)
        assert patch_tokens(sam, x).shape == (2, 24, 256) and patch_tokens(eva, x).shape == (2, 24, 64)
    with pytest.raises(ConfigError, match="pool must be one of mean for this sam model"):
        ClassificationModel(sam, 3, pool="cls")
    assert family_of(sam).pooled_dim(sam, "mean") == 256


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_evaluate_features_exact_swap_is_perfect_and_linear_is_not(name):
    build, size = FAMILIES[name]
    teacher = build()
    got = {}
    for kind in ("softmax", "linear-elu"):
        res = evaluate(adala.linearize(teacher, kind), task="features", data="photos:heldout", teacher=teacher,
                       img_size=size, length=2, batch_size=2)
        got[kind] = res["fidelity"]
    assert len(got["linear-elu"]["attn_rel_err"]) == len(teacher.blocks)
    assert got["softmax"]["final_cosine"] > 1 - 1e-6 and got["softmax"]["attn_rel_err_mean"] < 1e-6
    assert got["linear-elu"]["final_cosine"] < got["softmax"]["final_cosine"]
    assert got["linear-elu"]["attn_rel_err_mean"] > 1e-4


# --------------------------------------------------------------------------- hybrids


def test_sam_hybrid_candidates_are_the_global_blocks():
    teacher = tiny_sam()
    student = adala.linearize(teacher)  # block 0 windowed (softmax), block 1 global (linear-elu)
    assert hybrid.candidate_blocks(student) == [1]
    errors = hybrid.block_errors(student, teacher, img_size=64, batches=1, batch_size=2)
    assert errors[0] < 1e-6 < errors[1]
    assert hybrid.choose_softmax_blocks(errors, 1, hybrid.candidate_blocks(student)) == [1]
    with pytest.raises(ConfigError, match="1 linearized blocks"):
        hybrid.choose_softmax_blocks(errors, 2, hybrid.candidate_blocks(student))
    back = hybrid.make_hybrid(student, [1])
    assert block_kinds(back) == ["softmax", "softmax"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # untrained student: softmax restored from its (the teacher's) weights is the teacher
        assert torch.equal(back.forward_features(x), teacher.forward_features(x))

    every = adala.linearize(teacher, blocks="all")
    assert hybrid.candidate_blocks(every) == [0, 1]
    costs = hybrid.measure_costs(every, teacher, 64, repeats=1)
    # the windowed block (4 windows of 2×2) and the global block (4×4) are timed apart, on their real inputs
    assert costs["blocks"] == [0, 1] and len(costs["per_block"]["softmax"]) == 2
    assert all(t > 0 for t in costs["per_block"]["softmax"] + costs["per_block"]["linear"] + [costs["teacher"]])
    plan = hybrid.budget_plan(every, teacher, [0.1, 0.5], 0.01, 64, repeats=1)  # any hybrid meets 0.01×
    assert plan["met"] and plan["blocks"] == [0, 1] and plan["candidates"] == [0, 1]


def test_eva_hybrid_replays_rope_and_restores_softmax():
    teacher = tiny_eva("dinov3")
    student = adala.linearize(teacher)
    assert hybrid.candidate_blocks(student) == [0, 1]
    errors = hybrid.block_errors(student, teacher, img_size=64, batches=1, batch_size=2)
    assert len(errors) == 2 and min(errors) > 1e-6
    costs = hybrid.measure_costs(student, teacher, 64, repeats=1)
    assert len(costs["per_block"]["linear"]) == 2 and costs["softmax"] > 0
    worst = hybrid.choose_softmax_blocks(errors, 1, hybrid.candidate_blocks(student))
    assert worst == [max(range(2), key=lambda i: errors[i])]
    mixed = hybrid.make_hybrid(student, [0, 1])
    x = torch.randn(1, 3, 80, 64)  # another size: the restored softmax applies the model's RoPE for it
    with torch.no_grad():
        torch.testing.assert_close(mixed.forward_features(x), teacher.forward_features(x), rtol=1e-5, atol=1e-5)
    plan = hybrid.budget_plan(student, teacher, errors, 1e6, 64, repeats=1, measure=lambda b: 1.0)
    assert plan["blocks"] == [] and not plan["met"]  # no hybrid is a million times faster


def test_cli_keep_softmax_on_a_sam_teacher_keeps_the_global_block(tmp_path):
    teacher_dir = adala.save_model(tiny_sam(), tmp_path / "teacher")
    out = tmp_path / "hybrid"
    assert main(["linearize", "--teacher", str(teacher_dir), "--keep-softmax", "1", "--img-size", "64",
                 "--out", str(out)]) == 0
    info = json.loads((out / "adala.json").read_text())["hybrid"]
    assert info["softmax_blocks"] == [1] and len(info["block_errors"]) == 2
    assert block_kinds(adala.load_model(out)) == ["softmax", "softmax"]
    assert main(["linearize", "--teacher", str(teacher_dir), "--keep-softmax", "2", "--img-size", "64",
                 "--out", str(tmp_path / "bad")]) == 2
