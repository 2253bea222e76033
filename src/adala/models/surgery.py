"""Find the softmax self-attentions of a timm model and swap them for another kind, keeping weights.

The result is still the same timm model (``VisionTransformer``, ``Eva``, ``VisionTransformerSAM``:
forward_features / forward_head / dynamic image size unchanged): only ``blocks[i].attn`` changes; what
differs per architecture lives in its family adapter (``families``). SigLIP's attention-pool head stays softmax:
it has one query, so its cost is already linear in N.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .. import attention as attention_registry
from ..attention.base import KernelAttention, is_linear
from ..errors import ConfigError, UnsupportedModelError
from . import hf
from .config import get_config, set_config
from .families import family_of, supported

BLOCK_CHOICES = ("all", "global")


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm backbone inside ``model`` (itself, or ``model.backbone`` for task wrappers), of a supported family."""
    vit = getattr(model, "backbone", model)
    family_of(vit)
    return vit


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's self-attention, in order; a clear error for architectures we cannot swap."""
    vit = backbone_of(model)
    fam = family_of(vit)
    types = fam.attention_types()
    mods = []
    for i, block in enumerate(fam.blocks(vit)):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, types):
            raise UnsupportedModelError(
                f"block {i} has {type(attn).__name__} attention, which adala cannot swap; supported: {supported()}"
            )
        mods.append(attn)
    return mods


def block_kinds(model: nn.Module) -> list[str]:
    return [getattr(a, "kind", "softmax") for a in attention_modules(model)]


def linear_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks whose attention is a linear kind (see ``attention.base.is_linear``)."""
    return [i for i, a in enumerate(attention_modules(model)) if is_linear(a)]


def linearize_blocks(
    model: nn.Module, kinds: list[str], options: dict[str, Any] | None = None, inplace: bool = False
) -> nn.Module:
    """Give block i the attention ``kinds[i]``, built from its current (softmax) module."""
    options = options or {}
    mods = attention_modules(model)
    if len(kinds) != len(mods):
        raise UnsupportedModelError(f"{len(kinds)} attention kinds given for {len(mods)} blocks")
    for k in set(kinds):
        attention_registry.get(k)  # unknown names fail before any work
    cfg = get_config(model)
    if not inplace:
        model = copy.deepcopy(model)
    vit = backbone_of(model)
    fam = family_of(vit)
    for i, (block, kind) in enumerate(zip(fam.blocks(vit), kinds)):
        src = block.attn
        if isinstance(src, KernelAttention):
            if src.kind == kind:
                continue
            if src.kind != "softmax" and kind != "softmax":  # back to exact softmax: same qkv/proj
                raise UnsupportedModelError(f"block {i} is already {src.kind}; linearize a softmax model")
        elif kind == "softmax" and not fam.swaps_softmax:
            continue  # the family's own softmax module stays as it is
        new = fam.build_attention(kind, src, options, vit, i)
        new.train(src.training)
        block.attn = new
    fam.after_surgery(model)
    att = {"kind": _main_kind(kinds), "options": dict(options), "blocks": list(kinds)}
    return set_config(model, {**cfg, "attention": att})


def linearize(
    model: nn.Module,
    attention: str = "linear-elu",
    keep_softmax: list[int] | None = None,
    blocks: str | None = None,
    **options: Any,
) -> nn.Module:
    """A copy of ``model`` whose softmax attentions are ``attention`` (blocks in ``keep_softmax`` stay exact).

    ``blocks``: "all" swaps every block; "global" only those attending over all tokens (SAM's default: its
    windowed blocks already cost linear in the image). None takes the family's default.

    A ``transformers`` model (DINOv2, ViT, CLIP/SigLIP vision, DINOv3 ViT, or a Depth Anything / backbone built on
    one) stays that class: its attention is switched through transformers' registry (``hf_attention``), so
    ``model(pixel_values=...)`` and heads built on it keep working. ``adala.models.hf.to_timm`` gives timm instead.

    The copy is trainable like a fresh timm model: every parameter has ``requires_grad=True``, even
    though teachers come frozen (``load_teacher``), so a user's own training loop trains it. Its
    train/eval mode is the input's. adala's stages choose what they train themselves (stage 1 freezes
    all but the attention), and inference paths run under ``no_grad``/``inference_mode`` where the
    flag costs nothing; ``model`` itself is left untouched.
    """
    if hf.is_hf_model(model):
        # lazy: optional dependency: transformers (seconds to import)
        from .hf_attention import linearize_hf

        return linearize_hf(model, attention, keep_softmax, **options)
    if attention == "softmax" and options:  # its blocks are built without options; say so, not drop them
        raise ConfigError(f"attention softmax takes no options, got {', '.join(sorted(options))}")
    n = len(attention_modules(model))
    fam = family_of(model)
    blocks = fam.default_blocks if blocks is None else blocks
    if blocks not in BLOCK_CHOICES:
        raise ConfigError(f"blocks must be one of {', '.join(BLOCK_CHOICES)}, got {blocks!r}")
    keep = set(keep_softmax or [])
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise UnsupportedModelError(f"keep_softmax blocks {bad} out of range 0..{n - 1}")
    chosen = set(range(n)) if blocks == "all" else set(fam.global_blocks(backbone_of(model)))
    kinds = ["softmax" if i in keep or i not in chosen else attention for i in range(n)]
    student = linearize_blocks(model, kinds, options)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _main_kind(kinds: list[str]) -> str:
    non_softmax = [k for k in kinds if k != "softmax"]
    return non_softmax[0] if non_softmax else "softmax"
