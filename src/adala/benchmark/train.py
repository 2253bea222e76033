"""Train-step throughput of the two alignment stages, with the same objectives the stages optimise.

Stage 1 (attention alignment): one no-grad teacher pass records every block's attention input and
output; each student attention module gets the teacher's input and regresses the teacher's output
(MSE), attention parameters only. Stage 2 (feature alignment): no-grad teacher forward, student
forward/backward on the final tokens (MSE), all parameters. The objectives of ``adala.stages`` are
used when they import; otherwise a minimal local version with the same math (said in the JSON).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import family_of
from ..models.surgery import attention_modules, backbone_of
from .measure import interleaved, precision, summary


class _LocalAttentionAlignment(nn.Module):
    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student
        self.records: dict[int, tuple[torch.Tensor, dict, torch.Tensor]] = {}
        self.handles = [a.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, a in enumerate(attention_modules(teacher))]

    def _hook(self, i: int) -> Callable:
        def hook(_mod, args, kwargs, output):  # kwargs: Eva's rope, replayed to the student
            self.records[i] = (args[0].detach(), kwargs, output.detach())

        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            backbone_of(self.teacher).forward_features(x)
        losses = []
        for i, attn in enumerate(attention_modules(self.student)):
            if getattr(attn, "kind", "softmax") == "softmax":
                continue
            inp, kwargs, target = self.records[i]
            losses.append(F.mse_loss(attn(inp, **kwargs).float(), target.float()))
        self.records.clear()
        return torch.stack(losses).mean(), {}


class _LocalFeatureAlignment(nn.Module):
    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        t_vit, s_vit = backbone_of(self.teacher), backbone_of(self.student)
        with torch.no_grad():
            target = family_of(t_vit).features(t_vit, x)
        return F.mse_loss(family_of(s_vit).features(s_vit, x).float(), target.float()), {}


def _release(objective: nn.Module) -> None:
    """Remove the recording hooks an objective put on the teacher (the caller's module)."""
    recorder = getattr(objective, "recorder", None)
    if recorder is not None and hasattr(recorder, "remove"):
        recorder.remove()
    for h in getattr(objective, "handles", []):
        h.remove()


def _only_attention_trainable(student: nn.Module) -> None:
    for p in student.parameters():
        p.requires_grad_(False)
    for attn in attention_modules(student):
        if getattr(attn, "kind", "softmax") != "softmax":
            for name, p in attn.named_parameters():
                if not name.startswith("proj."):
                    p.requires_grad_(True)


def stage1_objective(teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, str]:
    """(objective, where it came from); ``student`` is a private copy whose trainable set is changed."""
    try:
        from ..stages.attention import AttentionAlignment, trainable_attention_params

        trainable_attention_params(student, "attention")
        return AttentionAlignment(teacher, student, train="attention"), "adala.stages.attention.AttentionAlignment"
    except (ImportError, AttributeError, TypeError):
        _only_attention_trainable(student)
        return _LocalAttentionAlignment(teacher, student), "adala.benchmark.train (local minimal)"


def stage2_objective(teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, str]:
    for p in student.parameters():
        p.requires_grad_(True)
    try:
        from ..stages.features import FeatureAlignment

        return FeatureAlignment(teacher, student, loss="mse"), "adala.stages.features.FeatureAlignment"
    except (ImportError, AttributeError, TypeError):
        return _LocalFeatureAlignment(teacher, student), "adala.benchmark.train (local minimal)"


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
