"""Shared fixtures: tiny random ViTs (seconds) and the embedded teacher (cached once per session)."""

from __future__ import annotations

import pytest
import torch

import adala


def tiny_teacher(arch: str = "vit_small_patch14_dinov2", **kw) -> torch.nn.Module:
    """A random-weight timm ViT with adala's config, small enough for unit tests."""
    args = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2, **kw}
    return adala.load_teacher(f"timm:{arch}", pretrained=False, **args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded_teacher():
    return adala.load_teacher("dinov2-s14")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def attention_io(teacher: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block's attention in one no-grad teacher forward of ``x``."""
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for b in teacher.blocks]
    try:
        with torch.no_grad():
            teacher.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def perturb_options(attn: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Random values where a linear kind's options start as exact identities (zero dwc, gate of 1, unit
    temperature), so a test of an option sees it do something."""
    with torch.no_grad():
        if attn.log_tau is not None:
            attn.log_tau.normal_(0, 0.5)
        if attn.dwc is not None:
            attn.dwc.weight.normal_(0, scale)
            attn.dwc.bias.normal_(0, scale)
        if attn.out_gate is not None:
            attn.out_gate.up.weight.normal_(0, scale)
            attn.out_gate.up.bias.normal_(0, scale)
    return attn
