"""The streamed CPU block forward (models.linear_block) against an independent float64 reference.

The reference is the same block run by timm's own ``Block.forward`` with the attention on its generic
``kernel="torch"`` path (``linear_attention`` on separate q/k/v), so neither the chunking nor the fused
packed-projection kernels are shared with what is checked.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from conftest import perturb_options, tiny_teacher
from timm.layers import GluMlp, SwiGLUPacked
from timm.models.vision_transformer import Block

import adala
from adala.attention import ops
from adala.errors import ConfigError, UnsupportedModelError
from adala.models import linear_block as lb
from adala.models.surgery import linearize_blocks


@pytest.fixture
def chunk():
    """Small chunks so a few dozen tokens already span several of them."""
    old = lb.set_chunk_tokens(16)
    yield 16
    lb.set_chunk_tokens(old)


def _student(kind: str = "linear-elu", init_values: float | None = 0.3, **options):
    teacher = tiny_teacher("vit_small_patch14_reg4_dinov2", init_values=init_values)  # cls + 4 registers
    return adala.linearize(teacher, kind, **options).eval().double()


def _reference(block: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(block)
    ref.__class__ = Block
    ref.attn.kernel = "torch"
    return ref


@pytest.mark.parametrize("n", [5, 16, 17, 40, 70, 97])  # one chunk, exact chunks, ragged, folded (N >= C=64)
@pytest.mark.parametrize("batch", [1, 3])
def test_streamed_block_matches_reference(chunk, n, batch):
    student = _student()
    block = student.blocks[1]
    assert isinstance(block, lb.LinearBlock)
    x = torch.randn(batch, n, 64, dtype=torch.float64)
    x_before = x.clone()
    with torch.no_grad():
        assert lb.can_stream(block, x)
        got = lb.streamed_forward(block, x)
        want = _reference(block)(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, x_before)  # the input is never written


@pytest.mark.parametrize("case", ["relu", "temperature", "no-layer-scale", "no-qkv-bias", "swiglu", "gelu-tanh"])
def test_streamed_variants_match_reference(chunk, case):
    options = {"temperature": True} if case == "temperature" else {}
    kind = "linear-relu" if case == "relu" else "linear-elu"
    teacher_kw = {
        "no-layer-scale": {"init_values": None}, "no-qkv-bias": {"qkv_bias": False},
        "swiglu": {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU},  # DINOv2-g's MLP: the module path
        "gelu-tanh": {"act_layer": partial(torch.nn.GELU, approximate="tanh")},
    }.get(case, {})
    teacher = tiny_teacher("vit_small_patch14_reg4_dinov2", **teacher_kw)
    student = adala.linearize(teacher, kind, **options).eval().double()
    block = student.blocks[0]
    assert isinstance(block.mlp, GluMlp) is (case == "swiglu")
    if case == "temperature":
        with torch.no_grad():
            block.attn.log_tau.normal_(0, 0.5)
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    with torch.no_grad():
        assert lb.can_stream(block, x)
        torch.testing.assert_close(lb.streamed_forward(block, x), _reference(block)(x), rtol=1e-12, atol=1e-12)


def test_linearized_model_takes_the_streamed_path_and_matches_reference(chunk, monkeypatch):
    student = _student()
    reference = copy.deepcopy(student)
    for b in reference.blocks:
        b.attn.kernel = "torch"
    calls = []
    real = lb.streamed_forward
    monkeypatch.setattr(lb, "streamed_forward", lambda blk, x: calls.append(x.shape) or real(blk, x))
    x = torch.randn(2, 3, 84, 84, dtype=torch.float64)  # 36 patches + 5 prefix tokens
    with torch.no_grad():
        got = student.get_intermediate_layers(x, n=2, return_prefix_tokens=True)
        want = reference.get_intermediate_layers(x, n=2, return_prefix_tokens=True)
        feats, feats_ref = student.forward_features(x), reference.forward_features(x)
    assert len(calls) == 2 * len(student.blocks)  # every block streamed, in both forwards
    for (a, pa), (b, pb) in zip(got, want):  # intermediates kept intact by later blocks
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(pa, pb, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(feats, feats_ref, rtol=1e-11, atol=1e-11)


def test_embedded_dinov2_output_unchanged(embedded_teacher, one_thread):
    student = adala.linearize(embedded_teacher).eval()
    reference = adala.linearize(embedded_teacher, kernel="torch").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = reference.forward_features(x)
        got = student.forward_features(x)  # 257 tokens: one chunk
        old = lb.set_chunk_tokens(100)  # three chunks per image, unfolded and folded states alike
        try:
            chunked = student.forward_features(x)
        finally:
            lb.set_chunk_tokens(old)
    assert all(isinstance(b, lb.LinearBlock) for b in student.blocks)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-5 * scale
    assert (chunked - want).abs().max() <= 2e-5 * scale


def _eligible(block: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return lb.can_stream(block, x)


def test_ineligible_calls_take_timm_path(monkeypatch):
    student = _student().float()
    block = student.blocks[0]
    x = torch.randn(1, 20, 64)
    assert _eligible(block, x)
    monkeypatch.setattr(lb, "streamed_forward", lambda *_: pytest.fail("streamed an ineligible call"))

    out = block(x)  # grad enabled and trainable parameters: autograd must see the real graph
    assert not lb.can_stream(block, x) and out.requires_grad
    out.sum().backward()
    assert block.attn.qkv.weight.grad is not None

    seen = []
    handle = block.attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        assert not lb.can_stream(block, x)
        block(x)
    handle.remove()
    assert seen == [(1, 20, 192)]  # the hook fired on the whole sequence

    handle = block.mlp.register_forward_pre_hook(lambda m, i: seen.append("mlp"))
    assert not _eligible(block, x)
    handle.remove()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lb.can_stream(block, x)
        block(x)

    assert not _eligible(block, x.to(torch.bfloat16))
    assert not _eligible(block, torch.randn(20, 64))  # not (B, N, C)
    with torch.no_grad(), pytest.raises(ValueError, match="attn_mask"):  # a mask goes to timm's path, which
        block(x, attn_mask=torch.ones(1, 20, 20, dtype=torch.bool))  # refuses it for non-causal linear attention


def test_stochastic_layers_and_other_kernels_are_not_streamed():
    teacher = tiny_teacher("vit_small_patch14_dinov2", drop_path_rate=0.5, init_values=0.1)
    student = adala.linearize(teacher)
    block = student.blocks[1]
    x = torch.randn(1, 20, 64)
    student.train()
    assert not _eligible(block, x)  # drop path active
    student.eval()
    assert _eligible(block, x)
    block.attn.kernel = "torch"
    assert not _eligible(block, x)
    torch_ref = adala.linearize(teacher, kernel="torch").eval()
    assert not _eligible(torch_ref.blocks[1], x)


def test_softmax_blocks_are_untouched_and_switching_back_is_exact():
    teacher = tiny_teacher("vit_small_patch14_dinov2", init_values=0.1).eval()
    student = adala.linearize(teacher, keep_softmax=[0])
    assert type(student.blocks[0]) is Block and isinstance(student.blocks[1], lb.LinearBlock)
    assert type(teacher.blocks[1]) is Block  # the teacher itself is never switched
    back = linearize_blocks(student, ["softmax", "softmax"]).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(back.forward_features(x), teacher.forward_features(x))


def test_saved_student_streams_again(tmp_path):
    student = _student().float()
    adala.save_model(student, tmp_path / "s")
    loaded = adala.load_model(tmp_path / "s").eval()
    assert all(isinstance(b, lb.LinearBlock) for b in loaded.blocks)
    assert all(isinstance(b, lb.LinearBlock) for b in copy.deepcopy(student).blocks)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), student.eval().forward_features(x))


def test_workspace_holds_one_image_of_queries_until_cleared(chunk, monkeypatch):
    # an earlier test in the same process may have called keep_freed_memory(): then φ(q) goes to a plain buffer
    monkeypatch.setattr(lb, "freed_memory_kept", lambda: False)
    student = _student()
    ops.clear_workspace()
    x = torch.randn(3, 50, 64, dtype=torch.float64)
    with torch.no_grad():
        lb.streamed_forward(student.blocks[0], x)
    assert ops.workspace_bytes() == 50 * 64 * 8  # one image's φ(q), not the batch's
    ops.clear_workspace()
    assert ops.workspace_bytes() == 0


def test_chunk_size_is_checked():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="chunk tokens"):
            lb.set_chunk_tokens(bad)


OPTION_CASES = [{"dwc": 3}, {"dwc": 5}, {"out_gate": 4}, {"temperature": True, "dwc": 3, "out_gate": 4},
                {"dwc": 3, "dwc_grid": 3}]  # taps 2 patches apart on 6×6, (1, 2) on 4×7


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "+".join(o))
@pytest.mark.parametrize("chunk_rows", [5, 16, 200])  # chunks shorter than a grid row, a few rows, whole images
@pytest.mark.parametrize("grid", [(6, 6), (4, 7)])  # square, and non-square from the patch-grid tracker
def test_streamed_options_match_reference(options, chunk_rows, grid):
    """dwc (the conv per chunk over its grid rows and halo), out_gate (per chunk from norm1) and temperature stream,
    on every split of the grid into chunks, and agree with timm's path over the generic mix."""
    old = lb.set_chunk_tokens(chunk_rows)
    try:
        block = _student(**options).blocks[1]
        perturb_options(block.attn)
        if grid != (6, 6):
            block.attn.grid = grid
        x = torch.randn(2, 5 + grid[0] * grid[1], 64, dtype=torch.float64)  # cls + 4 registers + patches
        with torch.no_grad():
            assert lb.can_stream(block, x)
            got = lb.streamed_forward(block, x)
            want = _reference(block)(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        plain = copy.deepcopy(block)
        plain.attn.dwc = plain.attn.out_gate = plain.attn.log_tau = None
        with torch.no_grad():
            assert not torch.allclose(got, lb.streamed_forward(plain, x), atol=1e-3)  # the options did something
    finally:
        lb.set_chunk_tokens(old)


def test_dwc_without_a_patch_grid_is_not_streamed():
    """33 patch tokens, no tracked grid: timm's path gives the one-line error rather than a guessed grid."""
    block = _student(dwc=3).blocks[0]
    x = torch.randn(1, 5 + 33, 64, dtype=torch.float64)
    assert not _eligible(block, x)
    with torch.no_grad(), pytest.raises(UnsupportedModelError, match="patch grid"):
        block(x)

