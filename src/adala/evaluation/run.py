"""``evaluate``: task scores (top-1 / mIoU) and, given a teacher, fidelity to it, written as JSON.

``img_size`` may be a list: the same images are then scored at every size (``by_size`` in the result), since
a linear-attention student's fidelity changes with the token count and users run it at 448²–1344².
``correspondence`` matches patches between two views of each held-out photo (see ``correspondence.py``).

Evaluation uses the un-augmented (eval) transform and, under torchrun, each rank scores every
world_size-th image; confusion matrices and fidelity sums are reduced over ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_positive
from ..data.build import heldout_spec, parse_spec
from ..data.model_datasets import dataset
from ..data.photos import _image_tensor, pool_sources
from ..errors import ConfigError
from ..files import write_json
from ..models.config import get_config
from ..models.resolve import as_model, as_teacher, check_img_size, check_pair
from ..models.surgery import attention_modules
from ..train.devices import check_fits, pick_device
from ..train.distributed import is_main
from ..train.sampler import eval_batches
from .correspondence import correspondence
from .fidelity import FidelityMeter
from .metrics import ConfusionMatrix, classification_scores, segmentation_scores

TASKS = ("classification", "linear-probe", "segmentation", "features", "correspondence")



def _task_head(model: nn.Module, task: str) -> dict:
    want = "segmentation" if task == "segmentation" else "classification"
    head = (getattr(model, "adala_config", None) or {}).get("task") or {}
    if head.get("type") != want:
        have = f"a {head['type']} head" if head.get("type") else "no task head"
        raise ConfigError(f"task {task!r} needs a model with a {want} head, this one has {have} "
                          "(fine-tune it first: adala finetune)")
    return head


def _correspondence(model: nn.Module, teacher: nn.Module, data: str, img_size: int, length: int | None,
                    device: torch.device) -> dict[str, Any]:
    """Correspondence accuracy of teacher and model on the source images of a photo collection spec."""
    names, images = source_images(data, length)
    cfg = get_config(model)
    model.eval().to(device)
    teacher.to(device)
    acc = correspondence({"teacher": teacher, "model": model}, images, img_size, cfg["mean"], cfg["std"], device)
    return {"task": "correspondence", "data": data, "img_size": img_size, "teacher_accuracy": acc["teacher"],
            "accuracy": acc["model"], "ratio_to_teacher": acc["model"] / max(acc["teacher"], 1e-12),
            "teacher_adjacent_cosine": acc["adjacent_cosine"]["teacher"],
            "adjacent_cosine": acc["adjacent_cosine"]["model"], "num_pairs": acc["num_pairs"], "images": names}


def source_images(data: str, length: int | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """Names and whole uint8 (3,H,W) images of a photo collection spec's sources (not crops): the correspondence
    task builds its own two views of each."""
    spec = parse_spec(data)
    kind = spec.kind
    if kind not in ("photos", "wallpapers", "heldout"):
        raise ConfigError(f"correspondence needs a photo collection (photos:heldout, wallpapers:heldout, heldout), "
                          f"got {data!r}")
    sources = pool_sources(kind, heldout_spec(spec))[:length]
    return [n for n, _ in sources], [_image_tensor(p) for _, p in sources]


def _output_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p if p.suffix == ".json" else p / "eval.json"


@torch.no_grad()
def evaluate(
    model: nn.Module | str | os.PathLike,
    *,
    task: str,
    data: str,
    img_size: int | list[int] = 224,
    teacher: nn.Module | str | None = None,
    batch_size: int = 32,
    length: int | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    num_workers: int = 0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scores of ``model`` on ``data`` for ``task`` (``features``: unlabeled data, fidelity only;
    ``correspondence``: patch matching between two views of each image of a photo collection, teacher vs model).

    ``img_size``: one size, or a list (result: ``{"by_size": {"224": {...}, ...}}``).
    ``out``: a ``.json`` file, or a directory that receives ``eval.json``.
    ``options``: attention options changed when loading a model directory (``load_model``), e.g. ``{"agents": 9}``
    to score a trained ``agent`` student with more agents; the result records them.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(img_size, (list, tuple)) and not img_size:
        raise ConfigError("img_size: empty list of sizes")
    model = as_model(model, options=options)  # loaded once, whatever the number of sizes
    if isinstance(img_size, (list, tuple)):  # and the teacher once too, then each size is scored
        teacher = None if teacher is None else as_teacher(teacher)
        by_size = {str(s): _scores(model, task, data, s, teacher, batch_size, length, device, num_workers)
                   for s in img_size}
        result = {"task": task, "data": data, "img_size": list(img_size), "by_size": by_size}
    else:
        result = _scores(model, task, data, img_size, teacher, batch_size, length, device, num_workers)
    if options:
        result["options"] = dict(options)
    if out is not None and is_main():
        write_json(_output_path(out), result)
    return result


def _scores(model: nn.Module, task: str, data: str, img_size: int, teacher: nn.Module | str | None,
            batch_size: int, length: int | None, device: str, num_workers: int) -> dict[str, Any]:
    """:func:`evaluate` at one size, on a loaded model."""
    check_positive(batch_size, "batch_size")
    check_img_size(model, img_size)
    check_fits(model, img_size, batch_size, device, train=False, amp="fp32")
    head = None if task in ("features", "correspondence") else _task_head(model, task)
    t_model = None
    if teacher is not None:
        t_model = as_teacher(teacher)
        check_pair(t_model, model)
    elif task in ("features", "correspondence"):
        raise ConfigError(f"task {task!r} compares with the teacher and needs one (--teacher)")
    if task == "correspondence":
        return _correspondence(model, t_model, data, img_size, length, pick_device(device))
    data_task = {"features": "unlabeled", "segmentation": "segmentation"}.get(task, "classification")
    ds = dataset(model, data, task=data_task, img_size=img_size, train=False, length=length)

    dev = pick_device(device)
    was_training = model.training
    model.eval().to(dev)
    if t_model is not None:
        t_model.to(dev)
    cm = ConfusionMatrix(head["num_classes"]) if head else None
    meter = FidelityMeter(len(attention_modules(model))) if t_model is not None else None
    for batch in eval_batches(ds, batch_size, num_workers=num_workers):
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(dev)
        if cm is not None:
            cm.update(model(x).argmax(1), batch[1])
        if meter is not None:
            meter.update(model, t_model, x)
    result: dict[str, Any] = {"task": task, "data": data, "img_size": img_size}
    if cm is not None:
        cm.all_reduce()
        names = head.get("class_names")
        result.update(segmentation_scores(cm, names) if task == "segmentation" else classification_scores(cm, names))
    if meter is not None:
        meter.all_reduce()
        result["fidelity"] = meter.result()
    model.train(was_training)
    return result
