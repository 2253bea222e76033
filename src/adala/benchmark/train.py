"""Train-step throughput of the two alignment stages, with the same objectives the stages optimise.

Stage 1 (attention alignment): one no-grad teacher pass records every block's attention input and
output; each student attention module gets the teacher's input and regresses the teacher's output
(MSE), attention parameters only. Stage 2 (feature alignment): no-grad teacher forward, student
forward/backward on the final tokens (MSE), all parameters. The objectives are the stages' own
(``AttentionAlignment``, ``FeatureAlignment``), named in the JSON.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..stages.align_attention import AttentionAlignment, trainable_attention_params
from ..stages.align_features import FeatureAlignment
from .measure import interleaved, precision, summary


def _release(objective: nn.Module) -> None:
    """Remove the recording hooks an objective put on the teacher (the caller's module)."""
    recorder = getattr(objective, "recorder", None)
    if recorder is not None and hasattr(recorder, "remove"):
        recorder.remove()
    for h in getattr(objective, "handles", []):
        h.remove()


def stage1_objective(teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, str]:
    """(stage 1's own objective, its name); ``student`` is a private copy whose trainable set is changed."""
    trainable_attention_params(student, "attention")
    objective = AttentionAlignment(teacher, student, trainable="attention")
    return objective, "adala.stages.align_attention.AttentionAlignment"


def stage2_objective(teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, str]:
    """(stage 2's own objective, its name), every parameter trainable."""
    for p in student.parameters():
        p.requires_grad_(True)
    return FeatureAlignment(teacher, student, loss="mse"), "adala.stages.align_features.FeatureAlignment"


def train_throughput(
    teacher: nn.Module,
    students: dict[str, nn.Module],
    resolution: int,
    batch_size: int,
    device: torch.device,
    dtype: str,
    repeats: int,
    warmup: int = 1,
) -> dict[str, Any]:
    """Steps/s and images/s of one optimiser step of stage 1 and stage 2 for every student,
    interleaved like the forward timings. Students are deep-copied; the given modules are untouched."""
    x = torch.randn(batch_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {"resolution": resolution, "batch_size": batch_size, "optimizer": "AdamW(lr=1e-6)"}
    for stage, make in (("stage1", stage1_objective), ("stage2", stage2_objective)):
        steps, names, sources, objectives = [], [], {}, []
        for name, student in students.items():
            copy_ = copy.deepcopy(student).to(device).train()
            objective, source = make(teacher, copy_)
            objective.train()
            objectives.append(objective)
            teacher.eval()
            params = [p for p in copy_.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-6)

            def step(objective=objective, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                with precision(device, dtype):
                    loss, _ = objective(x)
                loss.backward()
                opt.step()

            steps.append(step)
            names.append(name)
            sources[name] = {"objective": source, "trainable_params": sum(p.numel() for p in params)}
        try:
            times = interleaved(steps, device, repeats, warmup)
        finally:
            for objective in objectives:
                _release(objective)
        rows = []
        for name, t in zip(names, times):
            s = summary(t, batch_size)
            rows.append({"model": name, "step_ms": s["latency_ms"], "steps_per_s": 1e3 / s["latency_ms"],
                         "images_per_s": s["images_per_s"], "step_ms_all": s["latency_ms_all"], **sources[name]})
        out[stage] = rows
    return out
