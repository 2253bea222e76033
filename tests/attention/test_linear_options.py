"""linear-elu options temperature, dwc, out_gate: float64 references, identity at init, every path alike."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_options, tiny_teacher

import adala
from adala.attention import build
from adala.attention.grid import conv_dilation
from adala.attention.naive_kinds import linear_options_reference
from adala.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _attn(**options):
    t = tiny_teacher()
    a = build("linear-elu", t.blocks[0].attn, **options)
    return perturb_options(a, 0.3)


def _gate_reference(a, x):
    """2·sigmoid(up(down(x))) written out in float64: 2 / (1 + exp(-(x Wdᵀ Wuᵀ + b)))."""
    g = a.out_gate
    z = x.double() @ g.down.weight.double().T @ g.up.weight.double().T + g.up.bias.double()
    return 2.0 / (1.0 + torch.exp(-z))


@pytest.mark.parametrize("options", [{"temperature": True}, {"dwc": 3}, {"temperature": True, "dwc": 5},
                                     {"out_gate": 4}, {"temperature": True, "dwc": 3, "out_gate": 2},
                                     {"dwc": 3, "dwc_grid": 2}])  # taps 2-3 patches apart
@pytest.mark.parametrize("prefix,grid", [(1, (4, 4)), (1, (3, 5)), (0, (4, 3))])
def test_options_match_float64_reference(options, prefix, grid):
    a = _attn(**options).double()
    a.num_prefix_tokens, a.grid = prefix, grid
    h, w = grid
    x = torch.randn(2, prefix + h * w, a.qkv.in_features, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = a.qkv_heads(x)
        ref = linear_options_reference(q, k, v, a.log_tau, None if a.dwc is None else a.dwc.weight,
                                       None if a.dwc is None else a.dwc.bias, prefix, h, w,
                                       dilation=conv_dilation(h, w, a.dwc_grid))
        ref = ref.transpose(1, 2).reshape(2, -1, a.attn_dim)
        if a.out_gate is not None:
            ref = ref * _gate_reference(a, x)
        ref = a.proj(ref)
        fused = a(x)  # no-grad: the fused CPU path (in place on the packed projection)
    generic = a(x.requires_grad_())  # autograd: the generic mix path
    assert (fused - ref).abs().max() < 1e-10
    assert (generic.detach() - ref).abs().max() < 1e-10
    generic.sum().backward()
    if a.log_tau is not None:
        assert a.log_tau.grad is not None and a.log_tau.grad.abs().sum() > 0
    if a.dwc is not None:
        assert a.dwc.weight.grad.abs().sum() > 0
    if a.out_gate is not None:
        assert a.out_gate.down.weight.grad.abs().sum() > 0 and a.out_gate.up.weight.grad.abs().sum() > 0


def test_options_start_as_plain_linear_elu():
    t = tiny_teacher()
    x = torch.randn(2, 3, 56, 42)
    plain = adala.linearize(t, "linear-elu")
    opts = adala.linearize(t, "linear-elu", temperature=True, dwc=3, out_gate=4)
    with torch.no_grad():
        assert torch.allclose(plain.forward_features(x), opts.forward_features(x), atol=1e-6)
    extra = set(opts.state_dict()) - set(plain.state_dict())
    names = ("log_tau", "dwc.weight", "dwc.bias", "out_gate.down.weight", "out_gate.up.weight", "out_gate.up.bias")
    assert extra == {f"blocks.{i}.attn.{n}" for i in range(2) for n in names}


def test_options_save_load_and_non_square(tmp_path):
    t = tiny_teacher()
    s = adala.linearize(t, "linear-elu", temperature=True, dwc=3, out_gate=3)
    for m in s.modules():
        if getattr(m, "dwc", None) is not None:
            torch.nn.init.normal_(m.dwc.weight, 0, 0.1)
            torch.nn.init.normal_(m.out_gate.up.weight, 0, 0.1)
    adala.save_model(s, tmp_path / "m")
    back = adala.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 28, 70)  # 2x5 grid: the tracker gives the true grid
    with torch.no_grad():
        assert torch.equal(s.forward_features(x), back.forward_features(x))


@pytest.mark.parametrize("kind", ["linear-elu", "agent"])
def test_dwc_grid_is_weight_free_and_acts_only_on_wider_grids(tmp_path, kind):
    """A trained conv can be spread when loading (no weights change); on the grid it was trained at it changes
    nothing, on a wider grid it reads other patches (where they sit: the float64 references above)."""
    s = adala.linearize(tiny_teacher(init_values=0.3), kind, dwc=3)  # layer scale large enough to show attention
    for block in s.blocks:
        perturb_options(block.attn)
    adala.save_model(s, tmp_path / "s")
    spread = adala.load_model(tmp_path / "s", options={"dwc_grid": 4})  # as if trained at 56px: a 4×4 grid
    assert spread.adala_config["attention"]["options"]["dwc_grid"] == 4
    assert [b.attn.dwc_grid for b in spread.blocks] == [4, 4]
    small, large = torch.randn(1, 3, 56, 56), torch.randn(1, 3, 112, 112)  # 4×4: dilation 1; 8×8: dilation 2
    with torch.no_grad():
        assert torch.equal(s.forward_features(small), spread.forward_features(small))
        assert (s.forward_features(large) - spread.forward_features(large)).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [{"dwc": 2}, {"dwc": -1}, {"dwc": True}, {"temperature": "yes"}, {"dwc_grid": 16},
                                 {"out_gate": -1}, {"out_gate": True}, {"out_gate": 2.5}])
def test_bad_options_fail_in_one_line(bad):
    with pytest.raises(ConfigError):
        adala.linearize(tiny_teacher(), "linear-elu", **bad)


def test_out_gate_is_counted_in_flops():
    from adala.benchmark.flops import model_flops

    t = tiny_teacher()
    plain = model_flops(adala.linearize(t, "linear-elu"), 56)
    gated = model_flops(adala.linearize(t, "linear-elu", out_gate=4), 56)
    c, n = t.embed_dim, plain["tokens"]
    per_block = 2 * n * (c * 4 + 4 * c)  # down (C→4) and up (4→C) per token
    assert gated["total"] - plain["total"] == len(t.blocks) * per_block == gated["gate"]
