"""Stage 2, feature alignment: the whole student learns to reproduce the frozen teacher's final tokens.

After stage 1 each block mimics its teacher block given the *teacher's* input; in the student's own
forward the small per-block errors compound. Stage 2 trains all parameters end to end on the
``forward_features`` output (every token, prefix tokens included) to remove that drift.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import renamed
from ..data.model_datasets import dataset
from ..data.transforms import IndexedDataset, MultiSizeCollate
from ..errors import ConfigError
from ..models.families import family_of
from ..models.io import with_attention_options
from ..models.resolve import as_teacher, check_img_size, check_pair, trainable_copy
from ..models.surgery import backbone_of
from ..outdir import claim_output, is_finished, out_dir
from ..train.devices import check_fits
from ..train.loop import train as run_training
from ..train.loop import train_config
from .align_attention import TRAINABLE, trainable_attention_params
from .result import StageResult, finish, finished_result, stage_options

LOSSES = ("mse", "cosine", "mse+cosine", "cosine+smooth-l1")


def feature_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, loss: str
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``cosine+smooth-l1`` (IronViT's patch-token loss): direction per token plus a Huber term on the values,
    which, unlike MSE, is not dominated by the few high-norm tokens DINOv2 grows at high resolution."""
    s, t = student_tokens.float(), teacher_tokens.float()
    mse = F.mse_loss(s, t)
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    if loss == "cosine+smooth-l1":
        return (1.0 - cos) + F.smooth_l1_loss(s, t), {"mse": mse.detach(), "cosine": cos.detach()}
    value = {"mse": mse, "cosine": 1.0 - cos, "mse+cosine": mse + (1.0 - cos)}[loss]
    return value, {"mse": mse.detach(), "cosine": cos.detach()}


class FeatureAlignment(nn.Module):
    """Objective: ``forward(images) -> (loss(student tokens, teacher tokens), {"mse", "cosine"})``.

    ``cls_weight`` adds the same loss on the prefix tokens alone (CLS, registers) with that weight: in the mean
    over all tokens the one CLS token weighs 1/N (1/1025 at 448²), yet it is what a classifier or retrieval
    reads; 1 makes it count as much as all patches together."""

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: str = "mse", cls_weight: float = 0.0) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.teacher = teacher
        self.student = student
        self.loss = loss
        self.cls_weight = float(cls_weight)

    def train(self, mode: bool = True) -> FeatureAlignment:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        t_vit, s_vit = backbone_of(self.teacher), backbone_of(self.student)
        with torch.no_grad():
            target = family_of(t_vit).features(t_vit, x)
        pred = family_of(s_vit).features(s_vit, x)
        value, logs = feature_loss(pred, target, self.loss)
        prefix = family_of(t_vit).num_prefix_tokens(t_vit)
        if self.cls_weight and prefix:
            cls_value, cls_logs = feature_loss(pred[:, :prefix], target[:, :prefix], self.loss)
            value = value + self.cls_weight * cls_value
            logs = {**logs, "cls_cosine": cls_logs["cosine"]}
        return value, logs


def _select_trainable(student: nn.Module, trainable: str) -> None:
    if trainable not in TRAINABLE:
        raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if trainable == "all":
        for p in student.parameters():
            p.requires_grad_(True)
        return

    trainable_attention_params(student, trainable)


def align_features(
    teacher: nn.Module | str,
    student: nn.Module | str | os.PathLike,
    *,
    data: str | list[str] = "photos",
    img_size: int | list[int] = 224,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-4,
    loss: str = "mse",
    trainable: str = "all",
    mosaic: float = 0.0,
    cls_weight: float = 0.0,
    train_options: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    length: int | None = None,
    force: bool = False,
    train: str | None = None,
    **train_kwargs: Any,
) -> StageResult:
    """Stage 2. ``student`` may be a stage-1 output or straight from ``linearize`` (the stage-2-only ablation).

    ``img_size`` as a list trains at several resolutions: each batch is drawn at one of them (fixed by the
    seed and data order), so the student learns to stay faithful across token counts, not at one size.
    ``mosaic`` (0–1) replaces that fraction of images by 2×2 mosaics of four batch images
    (``adala.data.transforms.mosaic_batch``): new scenes from the same sources, for small datasets.
    ``cls_weight`` ≥ 0 adds the loss on the prefix tokens alone with that weight (:class:`FeatureAlignment`).
    ``train_options``: weight-free attention options in force while training only, as in stage 1
    (:func:`adala.models.io.with_attention_options`); the student is saved with its own.
    ``out`` must not be the student's or teacher's directory, and must be new, empty or adala's own unless
    ``force``; it is locked while the stage runs. ``resume=True`` on a finished stage is a no-op.
    """
    trainable = renamed("train", train, "trainable", trainable)
    out = out_dir(out, "align-features")
    with claim_output(out, "align-features", resume=bool(train_kwargs.get("resume", False)), force=force,
                      inputs=(("student", student), ("teacher", teacher))):
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if isinstance(mosaic, bool) or not isinstance(mosaic, (int, float)) or not 0 <= mosaic <= 1:
            raise ConfigError(f"mosaic must be a fraction from 0 to 1, got {mosaic!r}")
        if isinstance(cls_weight, bool) or not isinstance(cls_weight, (int, float)) or not cls_weight >= 0:
            raise ConfigError(f"cls_weight must be a number >= 0, got {cls_weight!r}")
        teacher = as_teacher(teacher)
        student = trainable_copy(student, "student")
        check_pair(teacher, student)
        sizes = [img_size] if not isinstance(img_size, (list, tuple)) else list(img_size)
        if not sizes:
            raise ConfigError("img_size: empty list of sizes")
        for s in sizes:
            check_img_size(teacher, s)
        cfg = train_config(steps=steps, batch_size=batch_size, lr=lr, train_kwargs=train_kwargs)
        check_fits(teacher, max(sizes), cfg.batch_size, cfg.device, amp=cfg.amp)
        trained = with_attention_options(student, train_options)  # student's own parameters, other options
        _select_trainable(trained, trainable)
        ds = dataset(teacher, data, task="unlabeled", img_size=max(sizes), train=True, seed=cfg.seed,
                     length=length)
        collate = None
        if len(sizes) > 1 or mosaic:
            if isinstance(ds, torch.utils.data.IterableDataset):
                raise ConfigError("several img_size values or mosaic need map-style data (not wds:)")
            ds, collate = IndexedDataset(ds), MultiSizeCollate(tuple(sizes), cfg.seed, float(mosaic))
        objective = FeatureAlignment(teacher, trained, loss, cls_weight)
        objective.run_config = stage_options(
            teacher, img_size=img_size, loss=loss, train=trainable, data=data, length=length,
            optional={"mosaic": float(mosaic), "cls_weight": float(cls_weight),
                      "train_options": dict(train_options or {})})
        result = run_training(objective, ds, cfg, out, stage="align-features", collate_fn=collate,
                              finished=is_finished(out))
        if result.already_finished:
            return finished_result(student, out, result.history)
        metrics = {"stage": "align-features", "steps": result.steps, "wall_time_s": result.wall_time_s,
                   "img_size": img_size, "loss_kind": loss, **result.final}
        return finish(student, out, metrics, result.history)
