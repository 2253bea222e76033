"""timm ``Eva`` family: DINOv3 (``vit_*_dinov3``), Perception Encoder (``vit_pe_core_*``), EVA-02 (``eva02_*``).

Rotary position embeddings (computed by the model per input size and passed to every block's attention as
``rope=``), SwiGLU MLPs, optional register tokens, sub-LN before ``proj``. Linear kinds are
:class:`adala.attention.rope.RopeKernelAttention`: RoPE as the softmax block applies it, then φ. The
teacher-pass recorder keeps each attention's ``rope`` keyword, so stage 1 replays it unchanged.
"""

from __future__ import annotations

from typing import Any

from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention
from torch import nn

from ..attention.rope import ROPE_KINDS, RopeKernelAttention
from ..errors import UnsupportedModelError
from .families import Family, register_family


class EvaFamily(Family):
    name = "eva"
    description = "timm Eva: DINOv3, PE-Core, EVA-02 (RoPE, SwiGLU, registers)"
    example = "dinov3-s16"
    timm_modules = ("timm.models.eva",)

    def matches(self, backbone: nn.Module) -> bool:
        return isinstance(backbone, Eva)

    def timm_kwargs(self) -> dict[str, Any]:
        return {"dynamic_img_size": True, "num_classes": 0}

    def attention_types(self) -> tuple[type, ...]:
        return (EvaAttention, AttentionRope, RopeKernelAttention)

    def build_attention(self, kind: str, src: nn.Module, options: dict[str, Any], backbone: nn.Module,
                        index: int) -> nn.Module:
        if kind not in ROPE_KINDS:
            raise UnsupportedModelError(
                f"attention kind {kind!r} is not available for Eva models; use one of {', '.join(ROPE_KINDS)}")
        return RopeKernelAttention(src, kind=kind, **(options if kind != "softmax" else {}))


EVA = register_family(EvaFamily())
