"""Names renamed by the layout change keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import json

import pytest
import torch

import adala
from adala import checks, files, runtime


def test_stages_evaluate_is_the_evaluation_function_with_a_warning():
    import adala.stages

    with pytest.warns(DeprecationWarning, match="adala.stages.evaluate is deprecated"):
        fn = adala.stages.evaluate
    assert fn is adala.evaluation.evaluate is adala.evaluate


def test_renamed_keyword_passes_the_old_value_and_warns():
    with pytest.warns(DeprecationWarning, match="train= is deprecated; use trainable="):
        assert checks.renamed("train", "all", "trainable", "attention") == "all"
    assert checks.renamed("train", None, "trainable", "attention") == "attention"


def test_align_attention_train_keyword_still_selects_the_trainable_set(tmp_path):
    from conftest import tiny_teacher

    teacher = tiny_teacher(img_size=28)
    with pytest.warns(DeprecationWarning, match="train= is deprecated"):
        with pytest.raises(adala.AdalaError, match="trainable must be one of"):
            adala.align_attention(teacher, img_size=28, steps=1, out=tmp_path / "o", train="mlp")


def test_keeps_freed_memory_is_the_query_under_its_new_name():
    with pytest.warns(DeprecationWarning, match="freed_memory_kept"):
        old = runtime.keeps_freed_memory()
    assert old == runtime.freed_memory_kept()


def test_focused_kernel_option_is_the_dwc_size():
    from conftest import tiny_teacher

    with pytest.warns(DeprecationWarning, match="kernel= is deprecated; use dwc="):
        old = adala.linearize(tiny_teacher(img_size=28), "focused", kernel=3)
    new = adala.linearize(tiny_teacher(img_size=28), "focused", dwc=3)
    assert old.blocks[0].attn.dwc.kernel_size == new.blocks[0].attn.dwc.kernel_size == (3, 3)


def test_one_json_rule_non_finite_becomes_null(tmp_path):
    data = {"a": float("inf"), "b": [float("nan"), 1.5], "t": torch.tensor(2.0), "p": tmp_path}
    text = files.dumps(data)
    back = json.loads(text)
    assert back == {"a": None, "b": [None, 1.5], "t": 2.0, "p": str(tmp_path)}
    assert "Infinity" not in text and "NaN" not in text
    assert files.decode_tuples(json.loads(files.dumps({"betas": (0.9, 0.99)}, tuples=True))) == {"betas": (0.9, 0.99)}
