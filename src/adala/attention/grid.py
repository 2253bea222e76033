"""The 2-D patch grid of a token sequence, for the kinds that work on it (window hybrid, dwc, focused).

A module's ``grid`` attribute (h, w) is kept fresh by a forward hook on ``patch_embed``
(:func:`attach_patch_grid`, installed by the model family after surgery); without it a square grid is assumed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError


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


def conv_dilation(h: int, w: int, dwc_grid: int) -> tuple[int, int]:
    """Dilation of a ``dwc`` conv on an h×w patch grid: its taps sit round(side / dwc_grid) patches apart along
    each axis (at least 1), so on any grid it reads the fraction of the image it reads on adjacent patches of a
    ``dwc_grid``-wide grid; ``dwc_grid`` 0 keeps adjacent patches everywhere. Trained at 224² (a 16-wide grid for
    14-pixel patches), G = 16 keeps that fraction exactly; the reference takes 32, half of it (README).

    Why: the teacher's positional embedding is interpolated to the grid, so what its attention reads near a patch
    is partly a fixed fraction of the image, which is more patches the larger the input. A 3×3 conv trained at
    224² and left on adjacent patches at 1344² reads a small part of that neighbourhood: spread by 3 there (and 2
    at 896², ``dwc_grid=32``) the reference student's held-out CLS cosine rose from 0.937 to 0.946 (0.954 to
    0.959 at 896²); spread as far as the image fraction asks (16: 4 and 6 patches) it gained as much but lost
    more patch correspondence (README)."""
    if not dwc_grid:
        return 1, 1
    return max(1, int(h / dwc_grid + 0.5)), max(1, int(w / dwc_grid + 0.5))


def grid_conv(conv: nn.Conv2d, x: torch.Tensor, dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``conv`` (a same-size, zero-padded depthwise conv) over NCHW ``x`` at ``dilation``: the padding grows with
    the dilation, so the output keeps the grid's size."""
    kh, kw = conv.kernel_size
    pad = (dilation[0] * (kh // 2), dilation[1] * (kw // 2))
    return F.conv2d(x, conv.weight.to(x.dtype), None if conv.bias is None else conv.bias.to(x.dtype), padding=pad,
                    dilation=dilation, groups=conv.groups)


def local_conv(channels: int, dwc: object, dwc_grid: object) -> nn.Conv2d | None:
    """The ``dwc`` option of a linear kind, checked: a zero-initialised depthwise ``dwc``×``dwc`` conv over
    ``channels`` (None for 0), so the kind starts as the exact identity of its plain self; ``dwc_grid`` (0, or a
    grid side G, see :func:`conv_dilation`) only with a conv to spread. One place for every kind that takes them."""
    if isinstance(dwc, bool) or not isinstance(dwc, int) or dwc < 0 or (dwc and dwc % 2 == 0):
        raise ConfigError(f"dwc must be 0 (off) or a positive odd kernel size, got {dwc!r}")
    if isinstance(dwc_grid, bool) or not isinstance(dwc_grid, int) or dwc_grid < 0:
        raise ConfigError(f"dwc_grid must be 0 (off) or a patch-grid side G (the dwc taps sit round(side / G) patches "
                          f"apart; 16 is 224² with 14-pixel patches), got {dwc_grid!r}")
    if dwc_grid and not dwc:
        raise ConfigError("dwc_grid spreads a dwc conv, so it needs dwc (e.g. dwc: 3)")
    if not dwc:
        return None
    conv = nn.Conv2d(channels, channels, dwc, padding=dwc // 2, groups=channels)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


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
