"""ONNX export: onnxruntime agrees with PyTorch for every kind that exports, at several sizes from one
file; the kinds that cannot export are refused in one line; tracers and compilers keep working."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_teacher

import adala
from adala.cli import main
from adala.errors import ConfigError, ExportCheckError, ExportError
from adala.models import export as export_mod
from adala.models.export import export_onnx

pytest.importorskip("onnxruntime")

TIGHT = 1e-4  # fp32 rounding through two blocks is ~3e-6; a graph that lost data flow is off by O(1)


def attentive_teacher(**kw) -> torch.nn.Module:
    """A tiny DINOv2 whose layer scales are 1: timm initialises them to 1e-5, which makes the attention
    branch invisible in the output, so a broken attention graph would still pass the comparison."""
    t = tiny_teacher(**kw)
    with torch.no_grad():
        for b in t.blocks:
            b.ls1.gamma.fill_(1.0)
            b.ls2.gamma.fill_(1.0)
    return t


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return attentive_teacher()


def _student(teacher, kind):
    return teacher if kind == "teacher" else adala.linearize(teacher, kind)


DYNAMIC_KINDS = ["teacher", "linear-elu", "linear-relu", "softmax", "hedgehog", "performer"]
STATIC_ONLY_KINDS = ["focused", "nystrom", "agent"]


@pytest.mark.parametrize("kind", DYNAMIC_KINDS)
def test_dynamic_export_matches_pytorch_at_several_sizes(teacher, kind, tmp_path):
    model = _student(teacher, kind)
    report = export_onnx(model, tmp_path / "m.onnx", dynamic=True, img_size=56, check_sizes=[56, 28, 84])
    assert (tmp_path / "m.onnx").is_file()
    assert sorted(report.errors) == [28, 56, 84]
    assert report.max_abs_error < TIGHT, report.errors


@pytest.mark.parametrize("kind", ["linear-elu", *STATIC_ONLY_KINDS])
def test_fixed_size_export_matches_pytorch(teacher, kind, tmp_path):
    report = export_onnx(_student(teacher, kind), tmp_path / "m.onnx", img_size=56)
    assert list(report.errors) == [56] and report.max_abs_error < TIGHT


@pytest.mark.parametrize("kind", ["linear-elu", "agent"])
def test_spread_conv_exports_at_a_fixed_size_only(teacher, kind, tmp_path):
    """dwc_grid's dilation (2 on the 4×4 grid of 56px) is baked into a fixed-size graph; a dynamic one is refused."""
    model = adala.linearize(teacher, kind, dwc=3, dwc_grid=2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.dwc.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, tmp_path / "m.onnx", img_size=56)
    assert report.max_abs_error < TIGHT
    with pytest.raises(ExportError, match="dwc_grid spreads the dwc conv"):
        export_onnx(adala.linearize(teacher, "linear-elu", dwc=3, dwc_grid=2), tmp_path / "d.onnx", dynamic=True,
                    img_size=56)


def test_kernel_torch_exports_too(teacher, tmp_path):
    report = export_onnx(adala.linearize(teacher, "linear-elu", kernel="torch"), tmp_path / "m.onnx",
                         dynamic=True, img_size=56, check_sizes=[56, 42])
    assert report.max_abs_error < TIGHT


def test_check_catches_the_no_grad_kernel_under_tracing(teacher, tmp_path, monkeypatch):
    """The original bug: linear_attention's no-grad path (out= writes into a fresh buffer) under the
    exporter became a constant. Re-enable it during export: the check must fail and remove the file."""
    import adala.attention.ops as kernels

    monkeypatch.setattr(kernels, "is_tracing", lambda: False)
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        export_onnx(adala.linearize(teacher, "linear-elu", kernel="torch"), tmp_path / "m.onnx", img_size=56)
    assert not (tmp_path / "m.onnx").exists()


def test_refusals_are_one_line(teacher, tmp_path):
    with pytest.raises(ExportError, match="window-hybrid attention cannot be exported"):
        export_onnx(adala.linearize(teacher, "window-hybrid"), tmp_path / "m.onnx", img_size=56)
    for kind in STATIC_ONLY_KINDS:
        with pytest.raises(ExportError, match=f"{kind} attention cannot be exported with dynamic sizes"):
            export_onnx(adala.linearize(teacher, kind), tmp_path / "m.onnx", dynamic=True, img_size=56)
    antialiased = tiny_teacher("vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(ExportError, match="antialiasing"):
        export_onnx(adala.linearize(antialiased), tmp_path / "m.onnx", dynamic=True)
    with pytest.raises(ConfigError, match="multiples of the patch size 14"):
        export_onnx(teacher, tmp_path / "m.onnx", img_size=50)
    with pytest.raises(ConfigError, match="fixed-size export only runs at 56px"):
        export_onnx(teacher, tmp_path / "m.onnx", img_size=56, check_sizes=[56, 28])
    assert not (tmp_path / "m.onnx").exists()


def test_antialiased_model_exports_at_a_fixed_size(tmp_path):
    """timm's antialiased resampling has no ONNX form; a fixed-size graph bakes the resampled embedding in."""
    model = adala.linearize(tiny_teacher("vit_tiny_patch16_224", img_size=32, patch_size=8))
    for size in (32, 48):  # native grid, and one that needs resampling
        assert export_onnx(model, tmp_path / f"m{size}.onnx", img_size=size).max_abs_error < TIGHT


def test_export_keeps_train_mode(teacher, tmp_path):
    student = adala.linearize(teacher).train()
    export_onnx(student, tmp_path / "m.onnx", img_size=56)
    assert student.training


def test_cli_export_of_a_saved_student(teacher, tmp_path, capsys):
    adala.save_model(adala.linearize(teacher, "linear-elu"), tmp_path / "student")
    out = tmp_path / "s.onnx"
    rc = main(["export", "--model", str(tmp_path / "student"), "--format", "onnx", "--dynamic",
               "--img-size", "56", "--check-sizes", "56,28", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "56px" in text and "28px" in text and "max |onnxruntime - torch|" in text
    assert main(["export", "--model", str(tmp_path / "student"), "--format", "onnx", "--dynamic",
                 "--img-size", "50", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adala: error:") and len(err.splitlines()) == 1


def test_jit_trace_matches_eager(teacher):
    student = adala.linearize(teacher, "linear-elu").eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, but people still deploy with it
        traced = torch.jit.trace(export_mod._Features(student), (x,), check_trace=False)
        assert torch.allclose(traced(x), student.forward_features(x), atol=1e-5)
        y = torch.randn(2, 3, 56, 56)  # the graph is not specialised to the example's values
        assert torch.allclose(traced(y), student.forward_features(y), atol=1e-5)


@pytest.mark.slow
def test_torch_compile_matches_eager(teacher):
    student = adala.linearize(teacher, "linear-elu").eval()
    x = torch.randn(2, 3, 56, 56)
    try:
        compiled = torch.compile(student.forward_features, backend="eager", fullgraph=False)
        with torch.no_grad():
            got = compiled(x)
    except Exception as e:  # noqa: BLE001 - no dynamo on this platform
        pytest.skip(f"torch.compile unavailable: {e}")
    with torch.no_grad():
        assert torch.allclose(got, student.forward_features(x), atol=1e-5)


@pytest.mark.slow
def test_embedded_student_exports_dynamic(embedded_teacher, tmp_path):
    """Real DINOv2-S/14 weights, where the original bug was off by ~10: one file, three sizes."""
    report = export_onnx(adala.linearize(embedded_teacher), tmp_path / "s.onnx", dynamic=True, img_size=224,
                         check_sizes=[224, 448, 112])
    assert report.max_abs_error < 1e-4, report.errors


def test_every_registered_kind_is_classified(teacher, tmp_path):
    """A new kind must either export (checked above) or be refused by name: no silent third state."""
    known = set(DYNAMIC_KINDS) | set(STATIC_ONLY_KINDS) | set(export_mod.NOT_EXPORTABLE)
    assert set(adala.attention.available()) <= known
    assert set(STATIC_ONLY_KINDS) == set(export_mod.STATIC_ONLY)
