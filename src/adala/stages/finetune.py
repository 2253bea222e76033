"""Stage 3, fine-tuning: a classification or segmentation head on the (linear-attention) backbone.

``classification`` and ``segmentation`` fine-tune backbone and head end to end (``freeze_backbone=True``
trains the head only); ``linear-probe`` is classification with a frozen backbone. With a frozen backbone
and data that fit in memory, features are computed once (un-augmented) and the head is trained on the
cached features, which is what a linear probe is and makes it cheap on a CPU. The saved directory holds
backbone + head and reloads with ``adala.load_model``.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive
from ..data.base import IGNORE_INDEX
from ..data.model_datasets import dataset
from ..errors import ConfigError, DataError
from ..evaluation import evaluate
from ..files import write_json
from ..models.config import get_config, set_config
from ..models.families import family_of
from ..models.heads import CLASSIFICATION_HEADS, SEGMENTATION_HEADS, task_config, wrap
from ..models.resolve import as_model, check_img_size, trainable_copy
from ..models.surgery import backbone_of
from ..outdir import claim_output, is_finished, out_dir
from ..train.devices import check_fits, pick_device
from ..train.distributed import is_main, world_size
from ..train.loop import train as run_training
from ..train.loop import train_config
from ..train.sampler import eval_batches
from .result import StageResult, finish, finished_result, stage_options

TASKS = ("classification", "linear-probe", "segmentation")
CACHE_LIMIT_BYTES = 2 * 1024**3
# task -> (batch_size, lr, epochs). Head-only training on cached features is cheap, so frozen heads get
# many small-batch epochs: a linear probe needs them to converge (measured on Fashion-MNIST features).
DEFAULTS = {
    "classification": (32, 1e-4, 1),
    "linear-probe": (64, 1e-3, 60),
    "segmentation": (16, 1e-4, 1),
}
FROZEN_DEFAULTS = {"classification": (64, 1e-3, 60), "segmentation": (32, 1e-3, 20)}


def _loss(logits: torch.Tensor, target: torch.Tensor, task_type: str) -> tuple[torch.Tensor, dict]:
    logits = logits.float()
    if task_type == "segmentation":
        if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        target = target.long()
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        valid = target != IGNORE_INDEX
        acc = ((logits.argmax(1) == target) & valid).sum() / valid.sum().clamp_min(1)
        return loss, {"pixel_acc": acc.detach()}
    loss = F.cross_entropy(logits, target.long())
    return loss, {"acc": (logits.argmax(1) == target).float().mean().detach()}


class TaskObjective(nn.Module):
    """End-to-end objective on images: ``model(x)`` against labels or masks."""

    def __init__(self, model: nn.Module, task_type: str, frozen_backbone: bool = False) -> None:
        super().__init__()
        self.student = model
        self.task_type = task_type
        self.frozen_backbone = frozen_backbone

    def train(self, mode: bool = True) -> TaskObjective:
        super().train(mode)
        if self.frozen_backbone:
            self.student.backbone.eval()
        return self

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict]:
        x, y = batch
        if self.frozen_backbone:
            with torch.no_grad():
                feats = self.student.features(x)
            logits = self.student.head(feats, size=tuple(x.shape[-2:])) if self.task_type == "segmentation" \
                else self.student.head(feats)
        else:
            logits = self.student(x)
        return _loss(logits, y, self.task_type)


class HeadObjective(nn.Module):
    """Head-only objective on cached backbone features: ``batch = (features, labels or masks)``."""

    def __init__(self, head: nn.Module, task_type: str) -> None:
        super().__init__()
        self.student = head
        self.task_type = task_type

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict]:
        feats, y = batch
        feats = feats.float()
        logits = self.student(feats, size=tuple(y.shape[-2:])) if self.task_type == "segmentation" \
            else self.student(feats)
        return _loss(logits, y, self.task_type)


def _labels(ds, data: str) -> tuple[int, list[str]]:
    n = getattr(ds, "num_classes", None)
    if not n:
        raise DataError(f"data {data!r} has no labels to fine-tune on")
    return int(n), list(getattr(ds, "class_names", None) or [str(i) for i in range(n)])


def _cache_bytes(model: nn.Module, n: int, img_size: int, task_type: str) -> int:
    vit = backbone_of(model)
    p = family_of(vit).patch_size(vit)
    if task_type == "segmentation":
        grid = (img_size // p) ** 2
        return n * (model.feature_dim * grid * 4 + img_size * img_size)
    return n * model.feature_dim * 4


@torch.no_grad()
def extract_features(model: nn.Module, ds, batch_size: int, device: torch.device, num_workers: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, targets)`` of every item of ``ds`` with the frozen backbone (all ranks compute all)."""
    model.eval().to(device)
    feats, targets = [], []
    for x, y in eval_batches(ds, batch_size, shard=False, num_workers=num_workers):
        feats.append(model.features(x.to(device)).float().cpu())
        targets.append(y.to(torch.uint8) if y.dim() > 1 and int(y.max()) <= 255 else y)
    return torch.cat(feats), torch.cat(targets)


def _steps_for(epochs: Any, steps: Any, n: int | None, batch_size: int, accum: int) -> int:
    if steps is not None:
        return check_positive(steps, "steps")
    check_positive(epochs, "epochs")
    if n is None:
        raise ConfigError("streaming data has no length: give steps instead of epochs")

    per_epoch = max(1, n // (batch_size * world_size() * accum))
    return max(1, math.ceil(epochs * per_epoch))


def finetune(
    model: nn.Module | str | os.PathLike,
    *,
    task: str = "classification",
    data: str = "fashion-mnist",
    img_size: int = 224,
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    head: str = "linear",
    freeze_backbone: bool | None = None,
    length: int | None = None,
    eval_data: str | None = None,
    eval_length: int | None = None,
    cache_features: str | bool = "auto",
    out: str | os.PathLike | None = None,
    force: bool = False,
    **train_kwargs: Any,
) -> StageResult:
    """Stage 3. ``model`` is a backbone (any stage's output, or a teacher) or a task model (its backbone
    gets a new head). ``epochs`` (default per task) or ``steps``; ``eval_data`` adds test scores to the metrics.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    task_type = "segmentation" if task == "segmentation" else "classification"
    heads = SEGMENTATION_HEADS if task_type == "segmentation" else CLASSIFICATION_HEADS
    if head not in heads:
        raise ConfigError(f"{task_type} head must be one of {', '.join(heads)}, got {head!r}")
    if task == "linear-probe":
        if freeze_backbone is False:
            raise ConfigError("linear-probe always freezes the backbone (use task classification to fine-tune)")
        freeze_backbone = True
    frozen = bool(freeze_backbone)
    d_bs, d_lr, d_epochs = FROZEN_DEFAULTS.get(task, DEFAULTS[task]) if frozen else DEFAULTS[task]
    batch_size = d_bs if batch_size is None else batch_size
    lr = d_lr if lr is None else lr
    if epochs is None and steps is None:
        epochs = d_epochs
    if cache_features not in ("auto", True, False):
        raise ConfigError(f"cache_features must be auto, true or false, got {cache_features!r}")

    out = out_dir(out, "finetune")
    with claim_output(out, "finetune", resume=bool(train_kwargs.get("resume", False)), force=force,
                      inputs=(("model", model),)):
        source = as_model(model)
        check_img_size(source, img_size)
        backbone = trainable_copy(backbone_of(source))
        set_config(backbone, {**get_config(source), "task": None})
        cfg = train_config(steps=steps or 1, batch_size=batch_size, lr=lr, train_kwargs=train_kwargs)  # validates
        check_fits(source, img_size, batch_size, cfg.device, train=not frozen, amp=cfg.amp)
        ds = dataset(source, data, task=task_type, img_size=img_size, train=not frozen, seed=cfg.seed, length=length)
        num_classes, names = _labels(ds, data)
        eval_ds_args = None
        if eval_data is not None:  # validate the eval data before any training
            dataset(source, eval_data, task=task_type, img_size=img_size, train=False, length=eval_length)
            eval_ds_args = dict(task=task, data=eval_data, img_size=img_size, length=eval_length,
                                batch_size=max(16, min(batch_size, 128)), device=cfg.device,
                                num_workers=cfg.num_workers)
        wrapper = wrap(backbone, task_config(task_type, num_classes, head, names, probe=frozen))
        for p in wrapper.backbone.parameters():
            p.requires_grad_(not frozen)

        options = stage_options(None, task=task, head=head, frozen_backbone=frozen, img_size=img_size, data=data,
                                length=length)
        n = len(ds) if hasattr(ds, "__len__") and not isinstance(ds, torch.utils.data.IterableDataset) else None
        cache = frozen and n is not None and (
            cache_features is True or (cache_features == "auto"
                                       and _cache_bytes(wrapper, n, img_size, task_type) <= CACHE_LIMIT_BYTES))
        if cache:
            batch_size = min(batch_size, n)
            cfg = replace(cfg, batch_size=batch_size, steps=_steps_for(epochs, steps, n, batch_size, cfg.accum_steps))
            feats, targets = extract_features(wrapper, ds, max(32, min(batch_size, 128)), pick_device(cfg.device),
                                              cfg.num_workers)
            wrapper.head.norm.fit(feats)
            train_ds = torch.utils.data.TensorDataset(feats, targets)
            objective = HeadObjective(wrapper.head, task_type)
            objective.run_config = options
            # cached features are in memory already: worker processes would only add IPC to every step
            result = run_training(objective, train_ds, replace(cfg, num_workers=0), out, stage=f"finetune-{task}",
                                  finished=is_finished(out))
        else:
            cfg = replace(cfg, steps=_steps_for(epochs, steps, n, batch_size, cfg.accum_steps))
            objective = TaskObjective(wrapper, task_type, frozen_backbone=frozen)
            objective.run_config = options
            result = run_training(objective, ds, cfg, out, stage=f"finetune-{task}", finished=is_finished(out))
        if result.already_finished:
            return finished_result(wrapper, out, result.history)

        metrics: dict[str, Any] = {"stage": "finetune", "task": task, "head": head, "frozen_backbone": frozen,
                                   "cached_features": bool(cache), "steps": result.steps, "img_size": img_size,
                                   "wall_time_s": result.wall_time_s, "train_images": n,
                                   **{f"train/{k}": v for k, v in result.final.items()}}
        wrapper.eval()
        if eval_ds_args is not None:
            scores = evaluate(wrapper, **eval_ds_args)
            if _is_main():
                write_json(out / "eval.json", scores)
            metrics["eval"] = scores
            for key in ("top1", "miou", "mean_class_accuracy", "pixel_accuracy"):
                if key in scores:
                    metrics[key] = scores[key]
        return finish(wrapper, out, metrics, result.history)


def _is_main() -> bool:
    return is_main()
