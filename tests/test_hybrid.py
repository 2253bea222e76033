"""Budgeted hybrids: worst-block choice, softmax restored from student weights, the budget predictor."""

from __future__ import annotations

import json

import pytest
import torch

import adala
from adala import hybrid
from adala.cli import main
from adala.errors import ConfigError
from adala.models.surgery import block_kinds


def _teacher(depth: int = 3):
    return adala.load_teacher("timm:vit_small_patch14_dinov2", pretrained=False, img_size=56, depth=depth,
                              embed_dim=64, num_heads=2)


def test_choose_softmax_blocks_takes_the_largest_errors_in_block_order():
    errors = [0.1, 0.5, 0.05, 0.9, 0.3]
    assert hybrid.choose_softmax_blocks(errors, 0) == []
    assert hybrid.choose_softmax_blocks(errors, 1) == [3]
    assert hybrid.choose_softmax_blocks(errors, 3) == [1, 3, 4]
    with pytest.raises(ConfigError, match="out of range"):
        hybrid.choose_softmax_blocks(errors, 6)


def test_make_hybrid_restores_exact_softmax_from_trained_student_weights():
    torch.manual_seed(0)
    teacher = _teacher()
    student = adala.linearize(teacher, "hedgehog")
    with torch.no_grad():  # stands in for stage-1 training: the hybrid must use these weights
        student.blocks[1].attn.qkv.weight.mul_(1.5)
    mixed = hybrid.make_hybrid(student, [1])
    assert block_kinds(mixed) == ["hedgehog", "softmax", "hedgehog"]
    assert block_kinds(student) == ["hedgehog"] * 3  # the input is not modified
    x = torch.randn(2, 17, 64)
    ref = teacher.blocks[1].attn
    with torch.no_grad():
        ref.qkv.weight.mul_(1.5)
        torch.testing.assert_close(mixed.blocks[1].attn(x), ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mixed.blocks[0].attn(x), student.blocks[0].attn(x))
    with pytest.raises(ConfigError, match="out of range"):
        hybrid.make_hybrid(student, [3])


def test_block_errors_are_per_block_and_zero_where_softmax_is_kept():
    teacher = _teacher()
    student = adala.linearize(teacher, "linear-elu", keep_softmax=[2])
    errors = hybrid.block_errors(student, teacher, img_size=28, batches=1, batch_size=2)
    assert len(errors) == 3
    assert errors[2] < 1e-5 < min(errors[:2])


def test_predictor_and_budget_step_down_with_injected_timings():
    costs = {"teacher": 10.0, "softmax": 2.0, "linear": 0.5}  # 4 blocks: 2 s of non-attention time
    assert hybrid.predict_speedup(costs, 4, 4) == pytest.approx(1.0)
    assert hybrid.predict_speedup(costs, 4, 0) == pytest.approx(10.0 / 4.0)
    # k softmax blocks: 2 + 2k + 0.5(4-k) = 4 + 1.5k -> speed-ups 2.5, 1.82, 1.43, 1.18, 1.0
    assert hybrid.largest_k(costs, 4, 1.8) == 1
    assert hybrid.largest_k(costs, 4, 1.4) == 2
    assert hybrid.largest_k(costs, 4, 3.0) == 0

    student = adala.linearize(_teacher(depth=4), "linear-elu")
    errors = [0.2, 0.8, 0.1, 0.4]
    seen = []

    def measure(blocks):  # the real hybrid is slower than predicted: k=2 misses, k=1 meets
        seen.append(blocks)
        return {2: 1.3, 1: 1.6, 0: 2.4}[len(blocks)]

    plan = hybrid.budget_plan(student, None, errors, 1.4, 56, costs=costs, measure=measure)
    assert seen == [[1, 3], [1]]
    assert plan["blocks"] == [1] and plan["met"] and plan["k"] == 1
    assert hybrid.blocks_for_budget(student, None, errors, 1.4, 56, costs=costs,
                                    measure=lambda b: 1.5) == [1, 3]
    plan = hybrid.budget_plan(student, None, errors, 9.0, 56, costs=costs, measure=lambda b: 2.4)
    assert plan["blocks"] == [] and not plan["met"]


def test_parse_budget():
    assert hybrid.parse_budget("2.0@896") == (2.0, 896)
    with pytest.raises(ConfigError, match="--speed-budget"):
        hybrid.parse_budget("2x")


def test_cli_keep_softmax_count_from_a_trained_student(tmp_path):
    teacher_dir = adala.save_model(_teacher(), tmp_path / "teacher")
    student = adala.linearize(adala.load_model(teacher_dir), "linear-elu")
    student_dir = adala.save_model(student, tmp_path / "student")
    out = tmp_path / "hybrid"
    assert main(["linearize", "--teacher", str(teacher_dir), "--student", str(student_dir),
                 "--keep-worst", "1", "--img-size", "28", "--out", str(out)]) == 0
    cfg = json.loads((out / "adala.json").read_text())
    info = cfg["hybrid"]
    assert len(info["block_errors"]) == 3
    worst = max(range(3), key=lambda i: info["block_errors"][i])
    assert info["softmax_blocks"] == [worst]
    kinds = block_kinds(adala.load_model(out))
    assert kinds[worst] == "softmax" and kinds.count("linear-elu") == 2

    out2 = tmp_path / "explicit"
    assert main(["linearize", "--teacher", str(teacher_dir), "--keep-blocks", "0,2", "--out", str(out2)]) == 0
    assert block_kinds(adala.load_model(out2)) == ["softmax", "linear-elu", "softmax"]


def test_cli_keep_softmax_auto_with_a_budget_any_model_meets(tmp_path):
    teacher_dir = adala.save_model(_teacher(), tmp_path / "teacher")
    out = tmp_path / "auto"
    assert main(["linearize", "--teacher", str(teacher_dir), "--keep-worst", "auto", "--speed-budget", "0.01@56",
                 "--img-size", "28", "--out", str(out)]) == 0
    info = json.loads((out / "adala.json").read_text())["hybrid"]
    assert info["budget"]["met"] and info["budget"]["k"] == 3  # every block fits a 0.01x budget
    assert info["softmax_blocks"] == [0, 1, 2]
    assert block_kinds(adala.load_model(out)) == ["softmax"] * 3


def test_cli_keep_softmax_count_still_works_with_a_deprecation_line(tmp_path, capsys):
    teacher_dir = adala.save_model(_teacher(), tmp_path / "teacher")
    out = tmp_path / "old"
    assert main(["linearize", "--teacher", str(teacher_dir), "--keep-softmax", "1", "--img-size", "28",
                 "--out", str(out)]) == 0
    assert "--keep-softmax K|auto is deprecated; use --keep-worst" in capsys.readouterr().err
    assert block_kinds(adala.load_model(out)).count("softmax") == 1


def test_hybridize_is_the_api_the_cli_calls():
    teacher = _teacher()
    student = adala.linearize(teacher, "linear-elu")
    model, info = hybrid.hybridize(student, teacher, keep_worst=1, img_size=28)
    assert info["softmax_blocks"] == hybrid.choose_softmax_blocks(info["block_errors"], 1)
    assert block_kinds(model).count("softmax") == 1 and block_kinds(student).count("softmax") == 0
    with pytest.raises(ConfigError, match="not both"):
        hybrid.hybridize(student, teacher, keep_worst=1, keep_blocks=[0])
