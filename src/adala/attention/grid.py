"""The 2-D patch grid of a token sequence, for the kinds that work on it (window hybrid, dwc, focused).

A module's ``grid`` attribute (h, w) is kept fresh by a forward hook on ``patch_embed``
(:func:`attach_patch_grid`, installed by the model family after surgery); without it a square grid is assumed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError


def patch_grid(module: nn.Module, n: int) -> tuple[int, int, int]:
    """(prefix, h, w) for a sequence of ``n`` tokens: ``module.grid`` when it fits, else a square grid."""
    prefix = int(getattr(module, "num_prefix_tokens", 0))
    patches = n - prefix
    grid = getattr(module, "grid", None)
    if grid is not None and grid[0] * grid[1] == patches:
        return prefix, int(grid[0]), int(grid[1])
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise UnsupportedModelError(
            f"{getattr(module, 'kind', 'this')} attention needs a patch grid: {patches} patch tokens "
            f"({n} tokens − {prefix} prefix) are not a square and no grid is known (adala.attention."
            "grid.attach_patch_grid(model) tracks it)"
        )
    return prefix, side, side


class _GridTracker:
    """Forward hook on ``patch_embed``: copies the patch grid of each forward to the attentions that need it.

    A plain object holding the modules in a list (not a Module, so no state-dict keys); ``copy.deepcopy`` of
    the model remaps the list to the copies because the whole model is copied with one memo.
    """

    def __init__(self, modules: list[nn.Module], patch_embed: nn.Module) -> None:
        self.modules = modules
        self.default = tuple(getattr(patch_embed, "grid_size", ()) or ())

    def __call__(self, patch_embed: nn.Module, args: Any, out: torch.Tensor) -> None:
        grid = tuple(out.shape[1:3]) if out.ndim == 4 else self.default  # NHWC when dynamic_img_size
        for m in self.modules:
            m.grid = grid if len(grid) == 2 else None


def attach_patch_grid(model: nn.Module) -> int:
    """Let every grid-using attention in the timm backbone ``model`` see the true (h, w) patch grid,
    non-square inputs included (a task wrapper is looked through to its ``backbone``).

    Idempotent; returns how many attention modules are tracked. Without it those kinds assume a square grid.
    """
    vit = getattr(model, "backbone", model)
    mods = [b.attn for b in vit.blocks if getattr(b.attn, "uses_grid", False)]
    pe = vit.patch_embed
    for key, hook in list(pe._forward_hooks.items()):
        if isinstance(hook, _GridTracker):
            del pe._forward_hooks[key]
    if mods:
        pe.register_forward_hook(_GridTracker(mods, pe))
    return len(mods)
