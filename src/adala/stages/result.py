"""What a stage returns and leaves behind: the model, then ``metrics.json`` last (a finished stage), and the
options a checkpoint records so that ``resume`` refuses a changed problem."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..files import jsonable, write_json
from ..models.io import save_model
from ..outdir import METRICS
from ..train.distributed import barrier, is_main


@dataclass
class StageResult:
    """A stage's trained model, where it was saved, its final metrics and its logged history."""

    model: nn.Module
    out_dir: Path
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    already_finished: bool = False  # ``resume`` found the stage finished: nothing was trained or written


def stage_options(teacher: nn.Module | None, optional: dict[str, Any] | None = None,
                  **options: Any) -> dict[str, Any]:
    """The stage options that shape the optimisation problem, recorded in every checkpoint and compared on
    resume (``objective.run_config``): the image size, loss, trainable set, data and the teacher's identity
    (its config, which names the spec and, for a saved model, the weights' sha256). TrainConfig fields
    (lr, steps, batch size, seed, ...) are compared by the engine itself.

    ``optional`` holds options added after checkpoints already existed (``mosaic``, ``cls_weight``,
    ``train_options``): each is recorded only when set, so a checkpoint written before it, which ran at its
    default, still resumes."""
    record = dict(options)
    record.update({k: v for k, v in (optional or {}).items() if v})
    if teacher is not None:
        cfg = dict(getattr(teacher, "adala_config", None) or {})
        cfg.pop("adala_version", None)  # upgrading adala does not change the teacher
        record["teacher"] = cfg
    return record


def finished_result(student: nn.Module, out: Path, history: list[dict]) -> StageResult:
    """The result of ``resume`` on a finished stage: its stored metrics, nothing rewritten."""
    try:
        metrics = json.loads((out / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{out / METRICS} is unreadable ({e})") from None
    student.eval()
    return StageResult(model=student, out_dir=out, metrics=metrics, history=list(history),
                       already_finished=True)


def finish(model: nn.Module, out: Path, metrics: dict, history: list[dict] | None = None,
           save: bool = True) -> StageResult:
    """Save model then ``metrics.json`` (rank 0 only): a directory with both is a finished stage."""
    model.eval()
    metrics = jsonable(metrics)
    if is_main():
        if save:
            save_model(model, out)
        else:
            out.mkdir(parents=True, exist_ok=True)
        write_json(out / METRICS, metrics)
    barrier()
    return StageResult(model=model, out_dir=out, metrics=metrics, history=list(history or []))
