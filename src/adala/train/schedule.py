"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention.base import KernelAttention
from ..errors import ConfigError


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr for the update made at 0-based ``step``.

    Linear warmup over ``warmup`` updates (the first update already gets lr/warmup, never 0), then a cosine
    from 1 down to ``min_ratio`` reached after the last update.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # a plain function, so state_dict() holds no callable state
        return lr_factor(step, total, warmup, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_parameters(objective: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` for every parameter with requires_grad, in module order (the optimizer's order)."""
    return [(n, p) for n, p in objective.named_parameters() if p.requires_grad]


def added_parameter_ids(module: nn.Module) -> set[int]:
    """ids of the parameters the attention kinds inside ``module`` added (``KernelAttention.added_parameters``)."""
    return {id(p) for m in module.modules() if isinstance(m, KernelAttention) for p in m.added_parameters()}


def build_optimizer(
    objective: nn.Module, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
    added_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, 1-D params (norms, scales) and what the student's
    ``no_weight_decay()`` names (timm: pos_embed, cls_token), since decaying those hurts ViTs.

    ``added_lr_scale`` multiplies the learning rate of the parameters the linearization added (their groups keep
    it through the schedule): they start at identity, and at the pretrained weights' lr a 300-step stage 1 left a
    zero-initialised ``dwc`` conv at |w| ≤ 0.04; 5x lifted held-out correspondence by 15-18 points (README)."""
    skip: set[int] = set()
    student = getattr(objective, "student", None)
    if student is not None and hasattr(student, "no_weight_decay"):
        names = set(student.no_weight_decay())
        skip = {id(p) for n, p in student.named_parameters() if n in names}
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias") and id(p) not in skip]
    no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias") and id(p) not in skip)]
    added = added_parameter_ids(objective) if added_lr_scale != 1.0 else set()
    if added_lr_scale != 1.0 and not added & {id(p) for _, p in named}:
        raise ConfigError(f"added_lr_scale={added_lr_scale:g} but nothing trained here was added by the "
                          "linearization (a dwc conv, temperatures, an output gate); drop it or train such an option")
    groups = [{"params": [p for p in params if (id(p) in added) == new], "weight_decay": wd,
               "lr": lr * added_lr_scale if new else lr}
              for new in (False, True) for params, wd in ((decay, weight_decay), (no_decay, 0.0))]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
