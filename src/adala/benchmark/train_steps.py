"""Training-step time and memory: the teacher's own (softmax) architecture against linear students, per stage.

Each stage's step is built from the stage's own objective, for the student and for a copy of the teacher trained
the same way (its own timm attention, torch SDPA), so a speed-up is the one a user sees when choosing what to train:

* ``stage1``: ``AttentionAlignment`` (one no-grad teacher pass records every block; each trained block's attention
  regresses the teacher's output from the teacher's input), attention parameters but ``proj`` trainable; the
  teacher-architecture copy trains every block's attention the same way.
* ``stage2``: ``FeatureAlignment`` (no-grad teacher forward, the model's forward+backward on the final tokens,
  MSE), every parameter.
* ``finetune``: ``TaskObjective`` on a ``ClassificationModel`` (pooled CLS+mean tokens, linear head, cross-entropy
  on random labels), backbone and head trained end to end.

One step is ``zero_grad``, the objective, ``backward`` and an ``AdamW`` step. Models are timed interleaved per
(stage, resolution); memory (optional) is the growth of peak RSS over one step in a fresh process on CPU
(``memchild``) and ``torch.cuda.max_memory_allocated`` growth in process on CUDA, after a warm-up step at a tiny
size (optimizer state exists, library start-up is not counted) with the gradients released.

Training FLOP bound (``training_flops``), from the forward counts of ``adala.benchmark.flops``: a matmul's
backward costs 2x its forward when both its input and its weight need a gradient (dX and dW are one product each),
1x when only one does; element-wise work counted in the forward (linear attention's φ and normaliser) is taken 2x
as well. So a fully trained model costs 3x its forward (the patch embedding 2x: images need no gradient), stage 1
costs per trained block 2x qkv (dW only: the recorded input has no gradient) + 3x the mixing + 2x proj (dX only:
frozen), and stages 1 and 2 add the teacher's no-grad forward. The bound is teacher-architecture FLOPs / student
FLOPs, the fraction is the measured speed-up over it. Not counted: the optimizer (the same for both), LayerNorm,
GELU, the losses, and the recomputation the student's backward does (one N·d² product per head, under 1 %).
"""

from __future__ import annotations

import copy
import gc
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..attention.base import is_linear
from ..errors import ConfigError
from ..models.families import family_of
from ..models.heads import ClassificationModel
from ..models.surgery import attention_modules, backbone_of
from ..stages.align_attention import AttentionAlignment, trainable_attention_params
from ..stages.align_features import FeatureAlignment
from ..stages.finetune import TaskObjective
from . import flops as flops_mod
from .measure import ExternalLoad, cuda_peak_memory, interleaved, precision, subprocess_peak_rss, summary

STAGES = ("stage1", "stage2", "finetune")
OBJECTIVES = {
    "stage1": "adala.stages.align_attention.AttentionAlignment",
    "stage2": "adala.stages.align_features.FeatureAlignment",
    "finetune": "adala.stages.finetune.TaskObjective (classification, linear head)",
}
TEACHER_ARCH = "teacher"
OPTIMIZER = "AdamW(lr=1e-6)"
NUM_CLASSES = 10
FLOP_CONVENTION = (
    "train-step FLOPs = forward + backward; backward = 2x forward per matmul whose input and weight both need "
    "gradients, 1x where only one does (patch embed: 1x; stage 1: qkv 1x, proj 1x, mixing 2x); stages 1 and 2 add "
    "the teacher's no-grad forward; optimizer, norms, GELU, losses not counted"
)


def check_stages(stages: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(stages))
    bad = [s for s in out if s not in STAGES]
    if bad or not out:
        raise ConfigError(f"train stages must be among {', '.join(STAGES)}, got {', '.join(bad) or 'none'}")
    return out


def _stage1_blocks(model: nn.Module) -> list[int]:
    """The blocks stage 1 trains: the linear ones; in the teacher's own architecture every block."""
    mods = attention_modules(backbone_of(model))
    linear = [i for i, a in enumerate(mods) if is_linear(a)]
    return linear or list(range(len(mods)))


class TrainStep:
    """One optimiser step of ``stage`` for ``model`` (modified: its trainable set, a head for ``finetune``).

    ``__call__(x)`` runs zero_grad, the objective at images ``x``, backward and the optimizer step. ``release()``
    removes the hooks stage 1 puts on the teacher."""

    def __init__(self, stage: str, teacher: nn.Module, model: nn.Module, device: torch.device, dtype: str) -> None:
        check_stages([stage])
        self.stage, self.device, self.dtype = stage, device, dtype
        teacher.eval()
        if stage == "stage1":
            blocks = _stage1_blocks(model)
            trainable_attention_params(model, "attention", blocks)
            self.objective: nn.Module = AttentionAlignment(teacher, model, trainable="attention")
            self.objective.blocks = blocks  # the teacher-architecture copy has no linear blocks to pick from
        elif stage == "stage2":
            for p in model.parameters():
                p.requires_grad_(True)
            self.objective = FeatureAlignment(teacher, model, loss="mse")
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            self.objective = TaskObjective(ClassificationModel(model, NUM_CLASSES, "linear").to(device),
                                           "classification")
        self.objective.train()
        self.params = [p for p in self.objective.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def __call__(self, x: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        batch = (x, torch.arange(x.shape[0], device=x.device) % NUM_CLASSES) if self.stage == "finetune" else x
        with precision(self.device, self.dtype):
            loss, _ = self.objective(batch)
        loss.backward()
        self.opt.step()

    def release(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        recorder = getattr(self.objective, "recorder", None)
        if recorder is not None:
            recorder.remove()


def training_flops(teacher: nn.Module, model: nn.Module, stage: str, resolution: int, batch_size: int) -> int | None:
    """Forward + backward FLOPs of one ``stage`` step of ``model`` (rules in the module docstring); None where a
    kind cannot be counted."""
    fl = flops_mod.model_flops(model, resolution, batch_size)
    if fl["total"] is None:
        return None
    if stage in ("stage2", "finetune"):
        own = fl["total"] + 2 * (fl["total"] - fl["patch_embed"]) + fl["patch_embed"]
        if stage == "finetune":
            return own
    else:
        own = 0
        for i in _stage1_blocks(model):
            b = fl["per_block"][i]
            own += 2 * b["qkv"] + 3 * b["attention"] + 2 * b["proj"]
    return own + flops_mod.model_flops(teacher, resolution, batch_size)["total"]


def step_peak_memory(step: TrainStep, x: torch.Tensor) -> int:
    """Bytes above the starting point during one step, in process (CUDA); a warm-up step at a tiny size first."""
    p = family_of(backbone_of(step.objective.student)).patch_size(backbone_of(step.objective.student))
    step(torch.zeros(x.shape[0], 3, 2 * p, 2 * p, device=x.device))
    step.opt.zero_grad(set_to_none=True)
    gc.collect()
    return cuda_peak_memory(lambda: step(x), x.device)


def train_steps(
    teacher: nn.Module,
    students: dict[str, nn.Module],
    resolutions: Sequence[int],
    batch_size: int,
    device: torch.device,
    dtype: str,
    repeats: int,
    warmup: int = 1,
    stages: Sequence[str] = STAGES,
    memory_stages: Sequence[str] = (),
    memory_recipes: dict[str, dict] | None = None,
    memory_repeats: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Step times of every stage for the teacher's architecture and each student, per resolution, interleaved,
    with FLOPs, the FLOP bound and the fraction of it reached; peak memory for ``memory_stages``.

    Every model is a deep copy (given modules are untouched). On CPU memory needs ``memory_recipes``: name ->
    the ``memchild`` recipe that rebuilds the model (``"teacher"`` included) with ``"teacher_source"``; a CPU peak is
    the median of ``memory_repeats`` fresh processes (single RSS readings of one step vary by several percent)."""
    say = progress or (lambda _msg: None)
    stages = check_stages(stages)
    memory_stages = [s for s in check_stages(memory_stages) if s in stages] if memory_stages else []
    models = {TEACHER_ARCH: teacher, **students}
    out: dict[str, Any] = {
        "resolutions": list(resolutions), "batch_size": batch_size, "stages": stages, "optimizer": OPTIMIZER,
        "objectives": {s: OBJECTIVES[s] for s in stages},
        "teacher_architecture": "a copy of the teacher (its own softmax attention, torch SDPA) trained the same way",
        "flop_convention": FLOP_CONVENTION,
        "memory_method": None if not memory_stages else (
            "torch.cuda.max_memory_allocated growth over one step (in-process)" if device.type == "cuda"
            else "peak RSS growth (VmHWM - VmRSS before) over one step in a fresh subprocess per case"),
        "results": [], "comparisons": [],
    }
    teacher.eval()
    for res in resolutions:
        x = torch.randn(batch_size, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device)
        for stage in stages:
            steps = {name: TrainStep(stage, teacher, copy.deepcopy(m).to(device), device, dtype)
                     for name, m in models.items()}
            say(f"train {stage} at {res}px: {len(steps)} models x {repeats} interleaved steps")
            probe = ExternalLoad().start()
            try:
                times = interleaved([lambda s=s, x=x: s(x) for s in steps.values()], device, repeats, warmup)
            finally:
                for s in steps.values():
                    s.release()
            external = probe.stop()
            rows = {}
            for (name, step), t in zip(steps.items(), times):
                s = summary(t, batch_size)
                fl = training_flops(teacher, models[name], stage, res, batch_size)
                row = {"stage": stage, "resolution": res, "model": name, "step_ms": s["latency_ms"],
                       "step_ms_all": s["latency_ms_all"], "steps_per_s": 1e3 / s["latency_ms"],
                       "images_per_s": s["images_per_s"], "external_load": external, "objective": OBJECTIVES[stage],
                       "trainable_params": step.trainable_params, "train_flops": fl,
                       "peak_memory_mb": None, "memory_error": None}
                rows[name] = row
            del steps
            gc.collect()
            if stage in memory_stages:
                for name in models:
                    _measure_memory(rows[name], stage, teacher, models[name], x, device, dtype, memory_recipes,
                                    memory_repeats, say)
            out["results"].extend(rows.values())
            t_row = rows[TEACHER_ARCH]
            for name in students:
                s_row = rows[name]
                speedup = t_row["step_ms"] / s_row["step_ms"]
                bound = t_row["train_flops"] / s_row["train_flops"] if t_row["train_flops"] and s_row["train_flops"] \
                    else None
                mem = (s_row["peak_memory_mb"] / t_row["peak_memory_mb"]
                       if t_row["peak_memory_mb"] and s_row["peak_memory_mb"] else None)
                out["comparisons"].append({
                    "stage": stage, "resolution": res, "student": name, "speedup": speedup, "flop_bound": bound,
                    "fraction_of_bound": None if bound is None else speedup / bound,
                    "memory_student_over_teacher": mem,
                })
                frac = "" if bound is None else f", bound {bound:.2f}x ({100 * speedup / bound:.0f}%)"
                say(f"train {stage} at {res}px: {name} {s_row['step_ms']:.0f} ms vs teacher {t_row['step_ms']:.0f} ms:"
                    f" {speedup:.2f}x{frac}")
    return out


def _measure_memory(row: dict[str, Any], stage: str, teacher: nn.Module, model: nn.Module, x: torch.Tensor,
                    device: torch.device, dtype: str, recipes: dict[str, dict] | None, repeats: int,
                    say: Callable[[str], None]) -> None:
    name, res = row["model"], row["resolution"]
    if device.type == "cuda":
        step = TrainStep(stage, teacher, copy.deepcopy(model).to(device), device, dtype)
        try:
            row["peak_memory_mb"] = step_peak_memory(step, x) / 2**20
        finally:
            step.release()
        return
    recipe = (recipes or {}).get(name)
    if recipe is None or "error" in recipe:
        row["memory_error"] = (recipe or {}).get("error", "no recipe to rebuild the model in a subprocess")
        return
    peaks = []
    for i in range(repeats):
        say(f"train {stage} at {res}px: peak memory of {name} (subprocess {i + 1}/{repeats})")
        got = subprocess_peak_rss({**recipe, "train_stage": stage, "resolution": res, "batch_size": x.shape[0],
                                   "dtype": dtype, "threads": torch.get_num_threads()})
        if "error" in got:
            row["memory_error"] = got["error"]
            return
        peaks.append(got["peak_bytes"] / 2**20)
    row["peak_memory_mb"], row["peak_memory_mb_all"] = statistics.median(peaks), peaks
