"""``train_options``: weight-free attention options in force while a stage trains, not in what it saves."""

import json

import pytest
import torch
from conftest import tiny_teacher

import adala
from adala import align_attention, align_features
from adala.errors import ConfigError
from adala.models.io import load_model, with_attention_options

# 56² with 14-pixel patches: a 4×4 grid; agents=4 pools it onto 16 agents, agents=2 onto 4
KW = {"data": "photos", "img_size": 56, "steps": 3, "batch_size": 2, "lr": 1e-2, "progress": False}


def _teacher() -> torch.nn.Module:
    """A random tiny teacher with its q/k scaled up: random weights attend almost uniformly, so 4 agents compute
    nearly what 16 do; sharper attention makes the agent count matter to the trained weights."""
    teacher = tiny_teacher()
    with torch.no_grad():
        for block in teacher.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(6.0)
    return teacher


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_view_shares_the_students_parameters_and_computes_with_its_options():
    teacher = _teacher()
    student = adala.linearize(teacher, "agent", agents=4, dwc=3)
    student.blocks[0].attn.qkv.weight.requires_grad_(False)
    view = with_attention_options(student, {"agents": 2})
    assert view.blocks[0].attn.agents == 2 and student.blocks[0].attn.agents == 4
    assert view.adala_config["attention"]["options"]["agents"] == 2
    assert student.adala_config["attention"]["options"]["agents"] == 4
    own = dict(student.named_parameters())
    for name, p in view.named_parameters():
        assert p is own[name]  # the same objects: training the view trains the student
        assert p.requires_grad == own[name].requires_grad
    x = torch.randn(1, 17, 64)  # CLS + the 4×4 grid (the blocks' LayerScale of 1e-5 hides it in the output)
    with torch.no_grad():
        assert not torch.allclose(view.blocks[0].attn(x), student.blocks[0].attn(x), atol=1e-3)
    assert with_attention_options(student, None) is student


def test_stage1_trains_under_its_options_and_saves_the_students_own(tmp_path):
    """Training the agents=4 student with train_options agents=2 gives exactly the weights of training an
    agents=2 student (and not those of training it at agents=4); the saved model keeps agents=4."""
    teacher = _teacher()
    coarse = align_attention(teacher, adala.linearize(teacher, "agent", agents=2, dwc=3), out=tmp_path / "a2", **KW)
    plain = align_attention(teacher, adala.linearize(teacher, "agent", agents=4, dwc=3), out=tmp_path / "a4", **KW)
    viewed = align_attention(teacher, adala.linearize(teacher, "agent", agents=4, dwc=3), out=tmp_path / "v",
                             train_options={"agents": 2}, **KW)
    want, got, other = _weights(coarse.model), _weights(viewed.model), _weights(plain.model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert any(not torch.equal(got[k], other[k]) for k in got)
    saved = load_model(tmp_path / "v")
    assert saved.adala_config["attention"]["options"]["agents"] == 4
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, got[k], rtol=0, atol=0)


def test_stage2_trains_under_its_options(tmp_path):
    teacher = _teacher()
    kw = {**KW, "trainable": "attention"}
    coarse = align_features(teacher, adala.linearize(teacher, "agent", agents=2), out=tmp_path / "a2", **kw)
    viewed = align_features(teacher, adala.linearize(teacher, "agent", agents=4), out=tmp_path / "v",
                            train_options={"agents": 2}, **kw)
    want, got = _weights(coarse.model), _weights(viewed.model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert load_model(tmp_path / "v").adala_config["attention"]["options"]["agents"] == 4


@pytest.mark.parametrize("options, message", [
    ({"dwc": 3}, "change the weights of the student"),
    ({"agentz": 2}, "agentz"),
])
def test_options_that_carry_weights_or_do_not_exist_are_refused_in_one_line(tmp_path, options, message):
    teacher = _teacher()
    with pytest.raises(ConfigError) as e:
        align_attention(teacher, adala.linearize(teacher, "agent", agents=4), out=tmp_path / "s1",
                        train_options=options, **KW)
    assert "\n" not in str(e.value) and message in str(e.value)


def test_cli_flag_and_recipe_key_train_under_the_options(tmp_path, capsys):
    """``--train-option`` and a recipe's ``train_options`` reach the stage: the saved student keeps its own
    options; one that carries weights exits 2 with one line."""
    from adala.cli import main

    teacher_dir = tmp_path / "teacher"
    adala.save_model(_teacher(), teacher_dir)
    student = tmp_path / "student"
    assert main(["linearize", "--teacher", str(teacher_dir), "--attention", "agent", "--out", str(student)]) == 0
    args = ["align-attention", "--teacher", str(teacher_dir), "--student", str(student), "--img-size", "56",
            "--steps", "2", "--batch-size", "2", "--quiet"]
    assert main([*args, "--train-option", "agents=2", "--out", str(tmp_path / "s1")]) == 0
    assert load_model(tmp_path / "s1").adala_config["attention"]["options"].get("agents", 8) == 8
    saved = json.loads(next((tmp_path / "s1" / "checkpoints").glob("step-*/state.json")).read_text())
    assert saved["run_config"]["train_options"] == {"agents": 2}
    capsys.readouterr()
    assert main([*args, "--train-option", "dwc=3", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "change the weights of the student" in err
