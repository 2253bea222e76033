"""Task wrappers (backbone + head) for stage 3, listed in ``TASK_BUILDERS`` so ``load_model`` rebuilds them.

Both wrappers expose ``.backbone`` (the timm model; ``backbone_of`` finds it) and split into ``features(x)``
(backbone side) and ``head(features)``: a frozen-backbone fine-tune can then cache features once and train
the very head module that is saved. Heads standardise their input with fixed buffers (per-feature mean/std
measured on the training features of a frozen backbone; identity otherwise), which is what makes a
linear probe converge in a few hundred cheap steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import get_config, set_config
from .families import family_of
from .surgery import backbone_of

CLASSIFICATION_HEADS = ("linear", "mlp")
SEGMENTATION_HEADS = ("linear", "linear4")


class Standardize(nn.Module):
    """``(x - mean) / std`` over the channel dim ``dim``, with saved (non-trained) statistics."""

    def __init__(self, channels: int, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def _shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._shape(x)
        return (x - self.mean.view(s).to(x.dtype)) / self.std.view(s).to(x.dtype)

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> None:
        """Statistics from features shaped (N, C) for dim=-1 or (N, C, H, W) for dim=1."""
        f = feats.float().movedim(self.dim, -1).reshape(-1, self.mean.numel())
        self.mean.copy_(f.mean(0))
        self.std.copy_(f.std(0).clamp_min(1e-6))


class ClassificationHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in CLASSIFICATION_HEADS:
            raise ConfigError(f"classification head must be one of {', '.join(CLASSIFICATION_HEADS)}, got {kind!r}")
        self.norm = Standardize(in_dim)
        if kind == "linear":
            self.fc = nn.Linear(in_dim, num_classes)
        else:
            self.fc = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, num_classes))
        last = self.fc if kind == "linear" else self.fc[-1]
        nn.init.trunc_normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(feats))


class ClassificationModel(nn.Module):
    """Logits from pooled features: CLS concatenated with the mean of patch tokens (mean only without CLS, e.g.
    SAM's neck grid); what pooling means for an architecture is its family's (``Family.pooled_features``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear", pool: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        vit = backbone_of(backbone)
        fam = family_of(vit)
        pools = fam.pools(vit)
        self.pool = pool or pools[0]
        if self.pool not in pools:
            raise ConfigError(f"pool must be one of {', '.join(pools)} for this {fam.name} model, got {self.pool!r}")
        self.feature_dim = fam.pooled_dim(vit, self.pool)
        self.head = ClassificationHead(self.feature_dim, num_classes, head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return family_of(self.backbone).pooled_features(self.backbone, x, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SegmentationHead(nn.Module):
    """Standardised grid features -> 1x1 conv logits (at patch resolution)."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.norm = Standardize(in_ch, dim=1)
        self.conv = nn.Conv2d(in_ch, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.conv(self.norm(feats))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class SegmentationModel(nn.Module):
    """Per-pixel logits: grid features, a 1x1 conv, bilinear upsampling to the image.

    ``linear`` uses the last layer's (normed) patch tokens reshaped to their grid (SAM: the neck's output);
    ``linear4`` concatenates the last four blocks' outputs (DINOv2's multi-level linear head).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear") -> None:
        super().__init__()
        if head not in SEGMENTATION_HEADS:
            raise ConfigError(f"segmentation head must be one of {', '.join(SEGMENTATION_HEADS)}, got {head!r}")
        self.backbone = backbone
        vit = backbone_of(backbone)
        self.levels = 1 if head == "linear" else min(4, len(family_of(vit).blocks(vit)))
        self.feature_dim = family_of(vit).feature_dim(vit) * self.levels
        self.head = SegmentationHead(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim, h, w) grid features (``Family.dense_features``: patch tokens, or SAM's neck)."""
        return family_of(self.backbone).dense_features(self.backbone, x, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), size=tuple(x.shape[-2:]))


def task_config(task_type: str, num_classes: int, head: str, class_names: list[str] | None = None,
                **extra: Any) -> dict[str, Any]:
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return {"type": task_type, "num_classes": int(num_classes), "head": head, "class_names": names, **extra}


def wrap(backbone: nn.Module, task: dict[str, Any]) -> nn.Module:
    """A task wrapper around ``backbone`` (a timm ViT with adala_config) carrying the merged config."""
    cfg = get_config(backbone)
    base = {**copy.deepcopy(cfg), "task": None}
    set_config(backbone, base)
    model = TASK_BUILDERS[task["type"]](backbone, task)
    return set_config(model, {**base, "task": dict(task)})


def _build_classification(backbone: nn.Module, task: dict) -> nn.Module:
    return ClassificationModel(backbone, int(task["num_classes"]), task.get("head", "linear"), task.get("pool"))


def _build_segmentation(backbone: nn.Module, task: dict) -> nn.Module:
    return SegmentationModel(backbone, int(task["num_classes"]), task.get("head", "linear"))


# task type -> builder(backbone, task_config) -> module: what ``load_model`` rebuilds a task model with
TASK_BUILDERS: dict[str, Callable[[nn.Module, dict], nn.Module]] = {
    "classification": _build_classification,
    "segmentation": _build_segmentation,
}
