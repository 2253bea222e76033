"""timm ``VisionTransformer`` family: ViT/DeiT/augreg, DINOv2 (with or without registers), CLIP and SigLIP towers.

The reference family: every attention kind in the registry applies, and DINOv2 checkpoints get their
antialias-free cached position-embedding resampling (``pos_embed``).
"""

from __future__ import annotations

from typing import Any

from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .. import attention as attention_registry
from ..attention.base import KernelAttention
from ..attention.grid import attach_patch_grid
from .agent_block import install_agent_blocks
from .families import Family, register_family
from .linear_block import install_streamed_blocks
from .pos_embed import use_cached_pos_embed


class VitFamily(Family):
    name = "vit"
    description = "timm VisionTransformer: ViT/DeiT/augreg, DINOv2 (with or without registers), CLIP, SigLIP"
    example = "timm:vit_small_patch14_dinov2.lvd142m"
    timm_modules = ("timm.models.vision_transformer",)
    swaps_softmax = True

    def matches(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, VisionTransformer)

    def timm_kwargs(self) -> dict[str, Any]:
        return {"dynamic_img_size": True, "num_classes": 0}

    def uses_antialias(self, name: str) -> bool:
        return "dinov2" not in name  # DINOv2 checkpoints were trained with antialias-free resampling

    def install(self, model: nn.Module, antialias: bool) -> nn.Module:
        return use_cached_pos_embed(model, antialias)

    def attention_types(self) -> tuple[type, ...]:
        return (Attention, KernelAttention)

    def build_attention(self, kind: str, src: nn.Module, options: dict[str, Any], backbone: nn.Module,
                        index: int) -> nn.Module:
        new = attention_registry.build(kind, src, **(options if kind != "softmax" else {}))
        new.num_prefix_tokens = backbone.num_prefix_tokens
        return new

    def after_surgery(self, model: nn.Module) -> None:
        attach_patch_grid(model)  # kinds that work on the 2-D patch grid learn its true (non-square) size
        blocks = list(getattr(model, "backbone", model).blocks)
        install_streamed_blocks(blocks)  # CPU inference streams
        install_agent_blocks(blocks)


VIT = register_family(VitFamily())
