"""timm ``VisionTransformerSAM``: the Segment Anything image encoder (``samvit_*``), 1024² inputs.

Most blocks attend within 14×14 windows (196 tokens, cost linear in the image already); a few
(``global_attn_indexes``) attend over the whole 64×64 grid: N² = 16.8 M pairs at 1024², where linear attention
pays. So ``linearize`` swaps the global blocks by default (``blocks="global"``) and the windowed ones on
request (``blocks="all"``). Blocks take and return (B, H, W, C); a windowed block's attention sees
(B·windows, ws, ws, C) after ``window_partition``. Stage 2 aligns the neck's output as (B, H·W, C) tokens;
stage 3's heads read the neck's grid (segmentation) or its mean (classification: there is no CLS token).
Relative position bias: see :mod:`adala.attention.sam` (``rel_pos="approx"`` or ``"drop"``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import VisionTransformerSAM, window_partition
from torch import nn

from ..attention.sam import SAM_KINDS, SamKernelAttention
from ..errors import UnsupportedModelError
from .families import Family, register_family


class SamFamily(Family):
    name = "sam"
    description = "timm VisionTransformerSAM: the SAM image encoder (windowed + global attention, rel-pos)"
    example = "sam-b16"
    timm_modules = ("timm.models.vision_transformer_sam",)
    default_blocks = "global"

    def matches(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, VisionTransformerSAM)

    def attention_types(self) -> tuple[type, ...]:
        return (SamAttention, SamKernelAttention)

    def num_prefix_tokens(self, backbone: nn.Module) -> int:
        return 0

    def global_blocks(self, backbone: nn.Module) -> list[int]:
        return [i for i, b in enumerate(backbone.blocks) if not b.window_size]

    def build_attention(self, kind: str, src: nn.Module, options: dict[str, Any], backbone: nn.Module,
                        index: int) -> nn.Module:
        if kind not in SAM_KINDS:
            raise UnsupportedModelError(
                f"attention kind {kind!r} is not available for SAM models; use one of {', '.join(SAM_KINDS)}")
        return SamKernelAttention(src, kind=kind, **(options if kind != "softmax" else {}))

    def attention_input(self, block: nn.Module, block_in: torch.Tensor) -> torch.Tensor:
        x = block.norm1(block_in)
        return window_partition(x, block.window_size)[0] if block.window_size else x

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return backbone.forward_features(x).flatten(2).transpose(1, 2)  # neck (B, C, H, W) -> (B, H·W, C)

    def feature_dim(self, backbone: nn.Module) -> int:
        convs = [m for m in backbone.neck.modules() if isinstance(m, nn.Conv2d)]
        return int(convs[-1].out_channels) if convs else self.embed_dim(backbone)

    def pools(self, backbone: nn.Module) -> tuple[str, ...]:
        return ("mean",)  # no CLS token: the neck's grid, averaged

    def pooled_features(self, backbone: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
        return backbone.forward_features(x).mean((2, 3))

    def dense_features(self, backbone: nn.Module, x: torch.Tensor, levels: int = 1) -> torch.Tensor:
        """The neck's (B, C, H/16, W/16) output; with ``levels`` > 1 timm runs the neck on each of the last
        blocks' outputs (its ``norm=True``: the neck holds SAM's only norms), so every level has the neck's C."""
        if levels > 1:
            return super().dense_features(backbone, x, levels)
        return backbone.forward_features(x)

    def attention_groups(self, backbone: nn.Module, index: int, img_size: int) -> tuple[int, int]:
        p = backbone.patch_embed.patch_size
        gh, gw = img_size // p[0], img_size // p[1]
        ws = backbone.blocks[index].window_size
        if not ws:
            return 1, gh * gw
        return math.ceil(gh / ws) * math.ceil(gw / ws), ws * ws  # windows of the zero-padded grid

    def extra_flops(self, backbone: nn.Module, img_size: int) -> dict[str, int]:
        p = backbone.patch_embed.patch_size
        n = (img_size // p[0]) * (img_size // p[1])
        convs = [m for m in backbone.neck.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            return {}
        return {"neck": sum(2 * n * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                            // m.groups for m in convs)}


SAM = register_family(SamFamily())
