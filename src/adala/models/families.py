"""Model families: what surgery, the stages, position handling and the FLOP counter need to know about one
timm architecture, behind one small interface, so adding a family is one ``family_<name>.py`` file.

Everything architecture-specific the rest of adala touches goes through a :class:`Family`: which module is
the backbone, its blocks and their softmax attentions, how a linear kind is built from one of them, how a
block's attention input is formed from the block's input (stage 1 with ``trainable="all"``), the final tokens
stage 2 aligns, the pooled and grid features stage 3's heads read, the token layout the FLOP counter needs
and the kwargs a teacher is built with. Stage code never branches on the architecture.
"""

from __future__ import annotations

from typing import Any

import timm.models
import torch
from torch import nn

from ..errors import UnsupportedModelError


class Family:
    """Defaults fit a timm ``VisionTransformer``-like layout (``blocks[i].attn``, ``norm1``, ``patch_embed``)."""

    name: str = "?"
    description: str = ""  # starts with the timm class name: error messages list these
    example: str = ""  # one teacher spec of this family, shown by ``adala teachers``
    timm_modules: tuple[str, ...] = ()  # timm modules whose entrypoints build this family
    default_blocks: str = "all"  # which blocks ``linearize`` swaps by default: "all" or "global"
    swaps_softmax: bool = False  # kind "softmax" replaces the timm module too (ViT), else leaves it as is

    # ---------------------------------------------------------------- identity and building
    def matches(self, backbone: nn.Module) -> bool:
        raise NotImplementedError

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every teacher of this family is built with (before the user's own)."""
        return {"num_classes": 0}

    def install(self, model: nn.Module, antialias: bool) -> nn.Module:
        """Position handling after the model is built (the ViT family's cached pos-embed resampling)."""
        return model

    def uses_antialias(self, name: str) -> bool:
        return True

    # ---------------------------------------------------------------- structure
    def blocks(self, backbone: nn.Module) -> list[nn.Module]:
        return list(backbone.blocks)

    def attention_types(self) -> tuple[type, ...]:
        """The softmax attention classes this family's adapter can swap."""
        raise NotImplementedError

    def num_prefix_tokens(self, backbone: nn.Module) -> int:
        return int(getattr(backbone, "num_prefix_tokens", 0))

    def patch_size(self, backbone: nn.Module) -> int:
        return int(backbone.patch_embed.patch_size[0])

    def embed_dim(self, backbone: nn.Module) -> int:
        return int(backbone.embed_dim)

    def global_blocks(self, backbone: nn.Module) -> list[int]:
        """Blocks whose attention sees every token (cost N²); all of them unless the family windows some."""
        return list(range(len(self.blocks(backbone))))

    # ---------------------------------------------------------------- surgery
    def build_attention(self, kind: str, src: nn.Module, options: dict[str, Any], backbone: nn.Module,
                        index: int) -> nn.Module:
        raise NotImplementedError

    def after_surgery(self, model: nn.Module) -> None:
        """Hook run once all blocks are swapped (e.g. grid trackers for kinds that need the patch grid)."""

    # ---------------------------------------------------------------- stages
    def attention_input(self, block: nn.Module, block_in: torch.Tensor) -> torch.Tensor:
        """What ``block.attn`` receives when the block is fed ``block_in`` (stage 1, ``trainable="all"``)."""
        return block.norm1(block_in)

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) final tokens that stage 2 aligns and evaluation compares."""
        return backbone.forward_features(x)

    # ---------------------------------------------------------------- task heads (stage 3)
    def feature_dim(self, backbone: nn.Module) -> int:
        """Channels per position of :meth:`dense_features` (one level) and per pooled part."""
        return self.embed_dim(backbone)

    def pools(self, backbone: nn.Module) -> tuple[str, ...]:
        """Pooled-feature choices for a classification head, the default first: CLS needs a CLS token."""
        return ("cls+mean", "cls", "mean") if getattr(backbone, "cls_token", None) is not None else ("mean",)

    def pooled_dim(self, backbone: nn.Module, pool: str) -> int:
        return self.feature_dim(backbone) * (2 if pool == "cls+mean" else 1)

    def pooled_features(self, backbone: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
        """(B, pooled_dim) from the final tokens: CLS, mean of patch tokens (registers excluded), or both."""
        tokens = backbone.forward_features(x)
        if pool == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens(backbone):].mean(1)
        return patches if pool == "mean" else torch.cat([tokens[:, 0], patches], dim=-1)

    def dense_features(self, backbone: nn.Module, x: torch.Tensor, levels: int = 1) -> torch.Tensor:
        """(B, feature_dim·levels, h, w) on the patch grid: the final patch tokens (prefix tokens dropped), or the
        last ``levels`` blocks' normed outputs concatenated (DINOv2's multi-level linear head)."""
        if levels > 1:
            maps = backbone.forward_intermediates(x, indices=levels, norm=True, output_fmt="NCHW",
                                                 intermediates_only=True)
            return torch.cat(maps, dim=1)
        tokens = backbone.forward_features(x)[:, self.num_prefix_tokens(backbone):]
        p = self.patch_size(backbone)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    # ---------------------------------------------------------------- FLOPs
    def tokens(self, backbone: nn.Module, img_size: int) -> int:
        """Sequence length at ``img_size``: prefix tokens (cls, registers) + patch grid."""
        p = backbone.patch_embed.patch_size
        return self.num_prefix_tokens(backbone) + (img_size // p[0]) * (img_size // p[1])

    def attention_groups(self, backbone: nn.Module, index: int, img_size: int) -> tuple[int, int]:
        """(independent attention groups, tokens per group) for block ``index``: (1, N) for global attention."""
        return 1, self.tokens(backbone, img_size)

    def extra_flops(self, backbone: nn.Module, img_size: int) -> dict[str, int]:
        """Matmul FLOPs outside patch embedding and blocks that ``forward_features`` runs (SAM's neck)."""
        return {}


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    _FAMILIES.append(family)
    return family


def families() -> list[Family]:
    _load()
    return list(_FAMILIES)


def _load() -> None:
    if not _FAMILIES:
        # lazy: cycle: the family modules import this one to register
        from . import family_vit  # noqa: F401, I001  (registration side effects; ViT first: listed first)
        from . import family_eva, family_sam  # noqa: F401


def supported() -> str:
    """One line naming every supported family, for error messages."""
    return "; ".join(f.description for f in families())


def family_of(model: nn.Module) -> Family:
    """The family of ``model`` (itself, or its ``.backbone`` for task wrappers); a one-line error otherwise."""
    backbone = getattr(model, "backbone", model)
    for fam in families():
        if fam.matches(backbone):
            return fam
    raise UnsupportedModelError(f"unsupported model {type(backbone).__name__}; supported: {supported()}")


def family_for_timm(name: str) -> Family | None:
    """The family whose timm module defines model ``name`` (before building it), or None (the ViT default)."""

    try:
        module = timm.models.model_entrypoint(name.split(".")[0]).__module__
    except Exception:  # noqa: BLE001 - an unknown name is reported by the caller
        return None
    for fam in families():
        if module in fam.timm_modules:
            return fam
    return None
