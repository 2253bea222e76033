"""save_model / load_model round trips and refusal of anything that is not safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_teacher

import adala
from adala.cli import main
from adala.errors import CheckpointError


def test_round_trip_gives_identical_outputs(tmp_path):
    student = adala.linearize(tiny_teacher(depth=3), "linear-elu", keep_softmax=[2])
    adala.save_model(student, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adala.json").read_text())
    assert cfg["attention"]["blocks"] == ["linear-elu", "linear-elu", "softmax"]
    assert cfg["arch"] == "vit_small_patch14_dinov2" and cfg["adala_version"] == adala.__version__
    back = adala.load_model(tmp_path / "m")
    x = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        assert torch.equal(student.eval().forward_features(x), back.forward_features(x))
    assert [b.attn.kind for b in back.blocks] == ["linear-elu", "linear-elu", "softmax"]


def test_load_teacher_accepts_saved_dir_and_safetensors_file(tmp_path):
    teacher = tiny_teacher()
    adala.save_model(teacher, tmp_path / "t")
    x = torch.randn(1, 3, 56, 56)
    for spec in [tmp_path / "t", tmp_path / "t" / "model.safetensors"]:
        again = adala.load_teacher(str(spec))
        with torch.no_grad():
            assert torch.equal(teacher(x), again(x))


def test_timm_style_directory_loads(tmp_path):
    from safetensors.torch import save_file

    teacher = tiny_teacher()
    d = tmp_path / "timm"
    d.mkdir()
    save_file(teacher.state_dict(), str(d / "model.safetensors"))
    model_args = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
    (d / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2", "num_classes": 0,
                                               "model_args": model_args}))
    again = adala.load_teacher(str(d))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(teacher(x), again(x))


def test_pickle_is_refused(tmp_path):
    p = tmp_path / "weights.pth"
    torch.save(tiny_teacher().state_dict(), p)
    with pytest.raises(CheckpointError, match="pickle files can run code"):
        adala.load_teacher(str(p))


def test_directory_without_config_and_corrupt_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adala.json"):
        adala.load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not found"):
        adala.load_model(tmp_path / "missing")
    adala.save_model(tiny_teacher(), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        adala.load_model(tmp_path / "m")


def test_cli_linearize_writes_a_loadable_dir(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["linearize", "--teacher", "dinov2-s14", "--attention", "linear-elu", "--out", str(out)]) == 0
    model = adala.load_model(out)
    assert {b.attn.kind for b in model.blocks} == {"linear-elu"}
    assert "22.06M parameters" in capsys.readouterr().out


def test_full_disk_is_one_line_naming_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from adala.models import weights

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(weights, "save_file", full_disk)
    out = tmp_path / "student"
    assert main(["linearize", "--teacher", "dinov2-s14", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err
    assert "model.safetensors: No space left on device (os error 28)" in err
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("argv, needle", [
    (["linearize", "--attention", "nope", "--out", "x"], "unknown attention kind"),
    (["linearize", "--teacher", "nope", "--out", "x"], "unknown teacher"),
    (["linearize", "--keep-softmax", "a,b", "--out", "x"], "--keep-softmax"),
    (["linearize"], "required"),
])
def test_cli_user_mistakes_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
