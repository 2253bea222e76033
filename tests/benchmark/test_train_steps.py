"""Training-step benchmark: what each stage's step trains, the FLOP rules, and memory in a fresh process."""

from __future__ import annotations

import copy

import pytest
import torch

import adala
from adala.benchmark import flops as flops_mod
from adala.benchmark.train_steps import TrainStep, check_stages, train_steps, training_flops
from adala.errors import ConfigError
from adala.models.surgery import attention_modules

SPEC = "dinov2-s14"
TINY = {"pretrained": False, "img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher():
    return adala.load_teacher(SPEC, **TINY)


def test_stage1_trains_attention_without_proj_in_both_architectures(teacher):
    for model in (copy.deepcopy(teacher), adala.linearize(teacher, "linear-elu")):
        step = TrainStep("stage1", teacher, model, CPU, "fp32")
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(".attn." in n and ".proj." not in n for n in trained)
        assert len({n.split(".attn.")[0] for n in trained}) == len(attention_modules(model))  # every block
        step(torch.randn(2, 3, 28, 28))
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trained  # the loss reached them
        step.release()
    assert not any(a._forward_hooks for a in attention_modules(teacher))


def test_training_flops_follow_the_stated_rules(teacher):
    student = adala.linearize(teacher, "linear-elu")
    fwd, t_fwd = flops_mod.model_flops(student, 112, 2), flops_mod.model_flops(teacher, 112, 2)
    embed = fwd["patch_embed"]
    assert training_flops(teacher, student, "finetune", 112, 2) == 3 * fwd["total"] - embed
    assert training_flops(teacher, student, "stage2", 112, 2) == 3 * fwd["total"] - embed + t_fwd["total"]
    blocks = fwd["per_block"]
    own = sum(2 * b["qkv"] + 3 * b["attention"] + 2 * b["proj"] for b in blocks)
    assert training_flops(teacher, student, "stage1", 112, 2) == own + t_fwd["total"]


def test_train_steps_record(teacher):
    record = train_steps(teacher, {"linear-elu": adala.linearize(teacher, "linear-elu")}, [28, 56], 2, CPU,
                         "fp32", repeats=1, warmup=0, stages=["stage2", "finetune"])
    assert [(r["stage"], r["resolution"], r["model"]) for r in record["results"]] == [
        (s, r, m) for r in (28, 56) for s in ("stage2", "finetune") for m in ("teacher", "linear-elu")]
    for c in record["comparisons"]:
        assert c["flop_bound"] > 0 and c["fraction_of_bound"] == pytest.approx(c["speedup"] / c["flop_bound"])
    assert all(r["peak_memory_mb"] is None for r in record["results"])  # memory not asked for


def test_check_stages():
    assert check_stages(["stage2", "stage2", "finetune"]) == ["stage2", "finetune"]
    with pytest.raises(ConfigError, match="stage3"):
        check_stages(["stage3"])


@pytest.mark.slow
def test_train_memory_in_fresh_subprocesses(teacher):
    src = {"teacher": SPEC, "teacher_kwargs": TINY}
    recipes = {"teacher": {"source": src, "teacher_source": src},
               "linear-elu": {"source": src, "attention": "linear-elu", "teacher_source": src}}
    record = train_steps(teacher, {"linear-elu": adala.linearize(teacher, "linear-elu")}, [56], 2, CPU, "fp32",
                         repeats=1, warmup=0, stages=["stage2"], memory_stages=["stage2"], memory_recipes=recipes)
    for row in record["results"]:
        assert row["memory_error"] is None and row["peak_memory_mb"] > 0
    assert record["comparisons"][0]["memory_student_over_teacher"] > 0
