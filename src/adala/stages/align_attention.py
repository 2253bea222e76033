"""Stage 1, attention alignment: every linear block learns to reproduce its softmax teacher block.

Teacher forcing: one no-grad teacher pass per batch records each block's attention input and output;
each student attention module gets the *teacher's* input and is trained with MSE to the teacher's output.
Blocks are then independent regressions solved together from that single pass, and the student's own
forward is never run, so errors cannot compound across depth while the attention learns.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.base import is_linear
from ..checks import renamed
from ..data.model_datasets import dataset
from ..errors import ConfigError
from ..models import linearize
from ..models.families import family_of
from ..models.io import with_attention_options
from ..models.recorder import TeacherRecorder
from ..models.resolve import as_teacher, check_img_size, check_pair, trainable_copy
from ..models.surgery import attention_modules, backbone_of, linear_blocks
from ..outdir import claim_output, is_finished, out_dir
from ..train.devices import check_fits
from ..train.loop import train as run_training
from ..train.loop import train_config
from .result import StageResult, finish, finished_result, stage_options

# what stage 1 may train (``trainable=``): read by the recipes' schema and the CLI
TRAINABLE = ("attention", "attention+proj", "all")


def trainable_attention_params(student: nn.Module, trainable: str, blocks: list[int] | None = None) -> list[str]:
    """Freeze the student except what ``trainable`` names, in the blocks whose attention was swapped
    (or in ``blocks``: the training-step benchmark trains a softmax copy of the teacher the same way).

    ``attention``: q/k/v projections and the kind's own parameters (everything in ``attn`` but ``proj``);
    ``attention+proj``: the whole attention module; ``all``: attention module and the block's ``norm1``
    (then fed the teacher's block input), i.e. every parameter stage 1's loss can reach.
    Returns the names of the trainable parameters.
    """
    if trainable not in TRAINABLE:
        raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    for p in student.parameters():
        p.requires_grad_(False)
    vit = backbone_of(student)
    names = []
    for i, (block, attn) in enumerate(zip(family_of(vit).blocks(vit), attention_modules(vit))):
        if (i not in blocks) if blocks is not None else not is_linear(attn):
            continue
        for name, p in attn.named_parameters():
            if trainable == "attention" and (name.startswith("proj.") or name.startswith("proj_drop.")):
                continue
            p.requires_grad_(True)
            names.append(f"blocks.{i}.attn.{name}")
        if trainable == "all":
            for name, p in block.norm1.named_parameters():
                p.requires_grad_(True)
                names.append(f"blocks.{i}.norm1.{name}")
    if not names:
        raise ConfigError("stage 1 has nothing to train: the student has no linear attention blocks")
    return names


class AttentionAlignment(nn.Module):
    """Objective: ``forward(images) -> (mean per-block MSE, {"loss/block_i": ...})`` from one teacher pass."""

    def __init__(self, teacher: nn.Module, student: nn.Module, trainable: str = "attention") -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.feed_block_input = trainable == "all"
        self.blocks = linear_blocks(student)
        self.recorder = TeacherRecorder(teacher, block_inputs=self.feed_block_input)

    def train(self, mode: bool = True) -> AttentionAlignment:
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval (no dropout, no drop-path)
        return self

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.recorder.clear()
        with torch.no_grad():
            backbone_of(self.teacher).forward_features(x)
        vit = backbone_of(self.student)
        fam = family_of(vit)
        blocks = fam.blocks(vit)
        losses, metrics = [], {}
        for i in self.blocks:
            block = blocks[i]
            rec = self.recorder
            inp = fam.attention_input(block, rec.block_in[i]) if self.feed_block_input else rec.attn_in[i]
            target = rec.attn_out[i].float()
            out = block.attn(inp, **rec.attn_kwargs[i]).float()
            loss_i = F.mse_loss(out, target)
            losses.append(loss_i)
            metrics[f"loss/block_{i}"] = loss_i.detach()
            with torch.no_grad():  # ‖out − target‖ from the loss itself: no second difference tensor
                metrics[f"rel_err/block_{i}"] = ((loss_i.detach() * target.numel()).sqrt()
                                                 / target.norm().clamp_min(1e-12))
        self.recorder.clear()
        return torch.stack(losses).mean(), metrics


def align_attention(
    teacher: nn.Module | str,
    student: nn.Module | str | os.PathLike | None = None,
    *,
    attention: str = "linear-elu",
    data: str | list[str] = "photos",
    img_size: int = 224,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-3,
    trainable: str = "attention",
    train_options: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    length: int | None = None,
    force: bool = False,
    train: str | None = None,
    **train_kwargs: Any,
) -> StageResult:
    """Stage 1. ``student`` defaults to ``adala.linearize(teacher, attention)``; unlabeled ``data``.

    Returns the aligned student (saved to ``out`` with ``metrics.json``; the engine's ``log.jsonl`` beside it).
    ``train_options``: weight-free attention options in force while training only (``{"agents": 4}``: the student
    learns with 16 agents and is saved with its own; :func:`adala.models.io.with_attention_options` says why).
    ``out`` must not be the student's or teacher's directory, and must be new, empty or adala's own unless
    ``force``; it is locked while the stage runs. ``resume=True`` on a finished stage is a no-op.
    """
    trainable = renamed("train", train, "trainable", trainable)
    out = out_dir(out, "align-attention")
    with claim_output(out, "align-attention", resume=bool(train_kwargs.get("resume", False)), force=force,
                      inputs=(("student", student), ("teacher", teacher))):
        teacher = as_teacher(teacher)
        student = linearize(teacher, attention) if student is None else trainable_copy(student, "student")
        check_pair(teacher, student)
        check_img_size(teacher, img_size)
        cfg = train_config(steps=steps, batch_size=batch_size, lr=lr, train_kwargs=train_kwargs)
        check_fits(teacher, img_size, cfg.batch_size, cfg.device, amp=cfg.amp)
        trained = with_attention_options(student, train_options)  # student's own parameters, other options
        trainable_attention_params(trained, trainable)
        ds = dataset(teacher, data, task="unlabeled", img_size=img_size, train=True, seed=cfg.seed, length=length)
        objective = AttentionAlignment(teacher, trained, trainable=trainable)
        objective.run_config = stage_options(teacher, img_size=img_size, train=trainable, data=data, length=length,
                                             optional={"train_options": dict(train_options or {})})
        try:
            result = run_training(objective, ds, cfg, out, stage="align-attention", finished=is_finished(out))
        finally:
            objective.recorder.remove()
        if result.already_finished:
            return finished_result(student, out, result.history)
        metrics = {"stage": "align-attention", "steps": result.steps, "wall_time_s": result.wall_time_s,
                   "img_size": img_size, "train": trainable, **result.final}
        return finish(student, out, metrics, result.history)
