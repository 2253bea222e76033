"""Find the softmax self-attentions of a timm ViT and swap them for another kind, keeping weights.

The result is still the same timm ``VisionTransformer`` (forward_features / forward_head / dynamic
image size unchanged): only ``blocks[i].attn`` changes. SigLIP's attention-pool head stays softmax:
it has one query, so its cost is already linear in N.
"""

from __future__ import annotations

import copy
from typing import Any

from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .. import attention as attention_registry
from ..attention.base import KernelAttention
from ..attention.window_hybrid import attach_patch_grid
from ..errors import UnsupportedModelError
from . import hf
from .config import get_config, set_config

SUPPORTED = (
    "timm VisionTransformer families: ViT/DeiT/augreg, DINOv2 (with or without registers), "
    "CLIP and SigLIP image towers"
)


def backbone_of(model: nn.Module) -> VisionTransformer:
    """The timm ViT inside ``model`` (itself, or ``model.backbone`` for task wrappers)."""
    vit = getattr(model, "backbone", model)
    if not isinstance(vit, VisionTransformer):
        raise UnsupportedModelError(f"unsupported model {type(vit).__name__}; supported: {SUPPORTED}")
    return vit


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's self-attention, in order; a clear error for architectures we cannot swap."""
    vit = backbone_of(model)
    mods = []
    for i, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, (Attention, KernelAttention)):
            raise UnsupportedModelError(
                f"block {i} has {type(attn).__name__} attention, which adala cannot swap; supported: {SUPPORTED}"
            )
        mods.append(attn)
    return mods


def block_kinds(model: nn.Module) -> list[str]:
    return [getattr(a, "kind", "softmax") for a in attention_modules(model)]


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
    num_prefix = vit.num_prefix_tokens
    for i, (block, kind) in enumerate(zip(vit.blocks, kinds)):
        src = block.attn
        if isinstance(src, KernelAttention):
            if src.kind == kind:
                continue
            if src.kind != "softmax" and kind != "softmax":  # back to exact softmax: same qkv/proj
                raise UnsupportedModelError(f"block {i} is already {src.kind}; linearize a softmax model")
        new = attention_registry.build(kind, src, **(options if kind != "softmax" else {}))
        new.num_prefix_tokens = num_prefix
        new.train(src.training)
        block.attn = new
    attach_patch_grid(model)  # kinds that work on the 2-D patch grid learn its true (non-square) size
    att = {"kind": _main_kind(kinds), "options": dict(options), "blocks": list(kinds)}
    return set_config(model, {**cfg, "attention": att})


def linearize(
    model: nn.Module,
    attention: str = "linear-elu",
    keep_softmax: list[int] | None = None,
    **options: Any,
) -> nn.Module:
    """A copy of ``model`` whose softmax attentions are ``attention`` (blocks in ``keep_softmax`` stay exact).

    The copy is trainable like a fresh timm model: every parameter has ``requires_grad=True``, even
    though teachers come frozen (``load_teacher``), so a user's own training loop trains it. Its
    train/eval mode is the input's. adala's stages choose what they train themselves (stage 1 freezes
    all but the attention), and inference paths run under ``no_grad``/``inference_mode`` where the
    flag costs nothing; ``model`` itself is left untouched.
    """
    if hf.is_hf_model(model):  # a transformers DINOv2/ViT/CLIP/SigLIP: its timm equivalent first
        model = hf.from_hf(model)
    n = len(attention_modules(model))
    keep = set(keep_softmax or [])
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise UnsupportedModelError(f"keep_softmax blocks {bad} out of range 0..{n - 1}")
    kinds = ["softmax" if i in keep else attention for i in range(n)]
    student = linearize_blocks(model, kinds, options)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def _main_kind(kinds: list[str]) -> str:
    non_softmax = [k for k in kinds if k != "softmax"]
    return non_softmax[0] if non_softmax else "softmax"
