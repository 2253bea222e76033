"""Classification and segmentation scores from one accumulated confusion matrix.

Rows are true classes, columns predictions. Top-1 and per-class accuracy, and mIoU with per-class IoU,
all follow from it; classes absent from both truth and prediction are left out of the mean (NaN per class).
"""

from __future__ import annotations

import math

import torch

from ..data.base import IGNORE_INDEX
from ..train.distributed import all_reduce_sum


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predictions (class ids, any shape) against targets of the same shape."""
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        pred, target = pred[keep], target[keep]
        pred = pred.clamp(0, self.num_classes - 1)
        idx = target * self.num_classes + pred
        self.mat += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        """Sum the matrix over ranks (a no-op in one process)."""
        self.mat = all_reduce_sum(self.mat)

    @property
    def total(self) -> int:
        return int(self.mat.sum())

    def top1(self) -> float:
        return float(self.mat.diag().sum()) / self.total if self.total else math.nan

    def per_class_accuracy(self) -> list[float]:
        rows = self.mat.sum(1)
        return [float(d) / float(r) if r else math.nan for d, r in zip(self.mat.diag(), rows)]

    def iou(self) -> list[float]:
        tp = self.mat.diag()
        union = self.mat.sum(0) + self.mat.sum(1) - tp
        return [float(t) / float(u) if u else math.nan for t, u in zip(tp, union)]

    def miou(self) -> float:
        vals = [v for v in self.iou() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def mean_class_accuracy(self) -> float:
        vals = [v for v in self.per_class_accuracy() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan


def named(values: list[float], names: list[str] | None) -> dict[str, float | None]:
    """Per-class values keyed by class name (JSON has no NaN: absent classes become null)."""
    names = names if names and len(names) == len(values) else [str(i) for i in range(len(values))]
    return {n: (None if math.isnan(v) else v) for n, v in zip(names, values)}


def classification_scores(cm: ConfusionMatrix, class_names: list[str] | None = None) -> dict:
    return {
        "top1": cm.top1(),
        "mean_class_accuracy": cm.mean_class_accuracy(),
        "per_class_accuracy": named(cm.per_class_accuracy(), class_names),
        "num_images": cm.total,
    }


def segmentation_scores(cm: ConfusionMatrix, class_names: list[str] | None = None) -> dict:
    return {
        "miou": cm.miou(),
        "pixel_accuracy": cm.top1(),
        "per_class_iou": named(cm.iou(), class_names),
        "num_pixels": cm.total,
    }
