"""Position-embedding resampling: cached per grid size at inference, exact, invalidated by updates."""

from __future__ import annotations

import copy

import torch
from timm.layers import resample_abs_pos_embed

import adala.models.pos_embed as pe_mod
from tests.conftest import tiny_teacher


def _count_resamples(monkeypatch) -> list:
    calls = []
    real = pe_mod.resample_abs_pos_embed
    monkeypatch.setattr(pe_mod, "resample_abs_pos_embed", lambda *a, **k: calls.append(k["new_size"]) or real(*a, **k))
    return calls


def test_inference_resamples_once_per_size_and_matches_timm(monkeypatch):
    model = tiny_teacher()  # dinov2 arch: antialias-free resampling
    calls = _count_resamples(monkeypatch)
    x = torch.randn(1, 3, 70, 84)
    with torch.inference_mode():
        first = model.forward_features(x)
        again = model.forward_features(x)
        model.forward_features(torch.randn(1, 3, 42, 42))
    assert calls == [(5, 6), (3, 3)]
    assert torch.equal(first, again)
    want = resample_abs_pos_embed(model.pos_embed, new_size=(5, 6), old_size=model.patch_embed.grid_size,
                                  num_prefix_tokens=model.num_prefix_tokens, antialias=False)
    got = pe_mod.resampled_pos_embed(model, 5, 6, antialias=False)
    assert torch.equal(got, want)


def test_update_load_and_copy_recompute(monkeypatch):
    model = tiny_teacher()
    calls = _count_resamples(monkeypatch)
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        before = model.forward_features(x)
        model.pos_embed.add_(0.5)  # an optimiser step or load_state_dict writes in place
        after = model.forward_features(x)
        clone = copy.deepcopy(model)
        from_clone = clone.forward_features(x)
    assert len(calls) == 3
    assert not torch.allclose(before, after)
    assert torch.equal(after, from_clone)


def test_training_gets_gradients_through_the_resampling(monkeypatch):
    model = tiny_teacher()
    model.pos_embed.requires_grad_(True)
    calls = _count_resamples(monkeypatch)
    x = torch.randn(1, 3, 70, 70)
    for _ in range(2):
        model.forward_features(x).sum().backward()
    assert len(calls) == 2  # never cached while the parameter needs a gradient
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
