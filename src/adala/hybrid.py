"""Budgeted hybrids: keep exact softmax in the blocks a linear student reproduces worst.

Not every block linearizes equally well; a few blocks carry most of the attention error. Switching
just those back to softmax (with the student's own, possibly stage-1-trained, q/k/v/proj) recovers
quality at a cost that grows with the number of softmax blocks. ``blocks_for_budget`` picks how many
fit a speed-up target: it times one softmax and one linear attention at the target resolution, predicts
the whole model as ``non-attention + k * t_softmax + (n - k) * t_linear``, and confirms the chosen k
with one real measurement, stepping down while it misses.

The candidates are the blocks the student linearized (``candidate_blocks``): every block for a ViT or Eva
student, SAM's global blocks for a default SAM student (its windowed blocks were never linearized, so
"keeping" them softmax would cost nothing and change nothing). Timings replay what each candidate's
attention really receives in the teacher at that resolution (SAM's windows or full grid, Eva's ``rope``),
once per distinct input shape, so a SAM student linearized in all blocks prices windowed and global
blocks apart.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .benchmark.measure import interleaved
from .data.model_datasets import dataset
from .errors import ConfigError
from .evaluation.fidelity import fidelity
from .models.config import get_config
from .models.families import family_of
from .models.recorder import TeacherRecorder
from .models.surgery import attention_modules, backbone_of, block_kinds, linear_blocks, linearize_blocks


def block_errors(student: nn.Module, teacher: nn.Module, data: str = "photos:heldout", img_size: int | None = None,
                 batches: int = 4, batch_size: int = 8, seed: int = 0) -> list[float]:
    """Per-block teacher-forced attention relative error of ``student`` on held-out images."""
    size = int(img_size or get_config(teacher).get("img_size") or 224)
    ds = dataset(teacher, data, task="unlabeled", img_size=size, train=False, seed=seed, length=batches * batch_size)
    items = [ds[i] for i in range(batches * batch_size)]
    xs = [torch.stack(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    was = student.training
    student.eval()
    try:
        return fidelity(student, teacher, xs)["attn_rel_err"]
    finally:
        student.train(was)


def candidate_blocks(student: nn.Module) -> list[int]:
    """Blocks a hybrid may switch back to softmax: the ones ``student`` linearized (for SAM by default its
    global blocks: ``linearize`` follows the family's ``default_blocks``)."""
    return linear_blocks(student)


def choose_softmax_blocks(errors: Sequence[float], k: int, candidates: Sequence[int] | None = None) -> list[int]:
    """Indices of the ``k`` largest errors among ``candidates`` (default: every block), in block order."""
    pool = list(range(len(errors))) if candidates is None else list(candidates)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(pool):
        n = len(pool)
        what = "blocks" if candidates is None else "linearized blocks"
        raise ConfigError(f"--keep-softmax {k!r} is out of range: the model has {n} {what} (0..{n})")
    worst = sorted(pool, key=lambda i: (-errors[i], i))[:k]
    return sorted(worst)


def make_hybrid(student: nn.Module, blocks: Sequence[int]) -> nn.Module:
    """A copy of ``student`` whose ``blocks`` compute exact softmax from their current q/k/v/proj."""
    kinds = block_kinds(student)
    bad = [i for i in blocks if not 0 <= i < len(kinds)]
    if bad:
        raise ConfigError(f"--keep-blocks {bad} out of range 0..{len(kinds) - 1}")
    for i in blocks:
        kinds[i] = "softmax"
    att = get_config(student).get("attention") or {}
    return linearize_blocks(student, kinds, dict(att.get("options") or {}))


# ------------------------------------------------------------------------------------- speed budget

def predict_speedup(costs: dict[str, float], num_blocks: int, k: int) -> float:
    """Teacher time / predicted hybrid time with ``k`` softmax blocks.

    ``costs``: ``teacher`` (whole forward), ``softmax`` and ``linear`` (one attention each), seconds.
    """
    rest = costs["teacher"] - num_blocks * costs["softmax"]
    hybrid = rest + k * costs["softmax"] + (num_blocks - k) * costs["linear"]
    return costs["teacher"] / max(hybrid, 1e-12)


def largest_k(costs: dict[str, float], num_blocks: int, speedup: float) -> int:
    """The most softmax blocks whose predicted speed-up still meets ``speedup`` (0 when none does)."""
    ok = [k for k in range(num_blocks + 1) if predict_speedup(costs, num_blocks, k) >= speedup]
    return max(ok) if ok else 0


def _median_times(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    with torch.inference_mode():
        times = interleaved(fns, torch.device("cpu"), repeats, warmup=1)
    return [statistics.median(t) for t in times]


def _attention_inputs(vit: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """What each block's attention receives when ``vit`` runs on ``x``: (input, keyword arguments), from the
    same teacher-pass recorder the alignment stages use (SAM windows, Eva's ``rope`` included)."""
    rec = TeacherRecorder(vit)
    try:
        with torch.inference_mode():
            vit.forward_features(x)
    finally:
        rec.remove()
    return list(zip(rec.attn_in, rec.attn_kwargs))


def measure_costs(student: nn.Module, teacher: nn.Module, resolution: int, repeats: int = 5) -> dict[str, Any]:
    """Median seconds of the teacher forward and of softmax vs linear attention at ``resolution``.

    ``softmax``/``linear``: the first candidate block's; ``per_block``: each candidate's (blocks whose
    attention input has the same shape share one measurement), which :func:`budget_plan` predicts from.
    """
    t_vit, s_vit = backbone_of(teacher), backbone_of(student)
    x = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    inputs = _attention_inputs(t_vit, x)
    t_mods, s_mods = attention_modules(t_vit), attention_modules(s_vit)
    kinds = block_kinds(s_vit)
    cand = candidate_blocks(s_vit)
    rep: dict[tuple, int] = {}  # (input shape, student kind) -> the block timed for it
    for i in cand or [0]:
        rep.setdefault((tuple(inputs[i][0].shape), kinds[i]), i)
    fns: list[Callable[[], Any]] = [lambda: t_vit.forward_features(x)]
    for i in rep.values():
        h, kw = inputs[i]
        fns += [lambda i=i, h=h, kw=kw: t_mods[i](h, **kw), lambda i=i, h=h, kw=kw: s_mods[i](h, **kw)]
    times = _median_times(fns, repeats)
    by_rep = {i: (times[1 + 2 * j], times[2 + 2 * j]) for j, i in enumerate(rep.values())}
    of = {i: rep[(tuple(inputs[i][0].shape), kinds[i])] for i in cand}
    first = by_rep[of[cand[0]] if cand else 0]
    return {"teacher": times[0], "softmax": first[0], "linear": first[1], "blocks": cand,
            "per_block": {"softmax": [by_rep[of[i]][0] for i in cand], "linear": [by_rep[of[i]][1] for i in cand]}}


def predicted_speedup(costs: dict[str, Any], candidates: Sequence[int], softmax_blocks: Sequence[int]) -> float:
    """:func:`predict_speedup` for a chosen set: per-block costs when ``costs`` has them, else the scalars."""
    per = costs.get("per_block")
    if not per or len(per["softmax"]) != len(candidates):
        return predict_speedup(costs, len(candidates), len(softmax_blocks))
    keep = set(softmax_blocks)
    soft, lin = per["softmax"], per["linear"]
    rest = costs["teacher"] - sum(soft)
    hybrid = rest + sum(soft[j] if i in keep else lin[j] for j, i in enumerate(candidates))
    return costs["teacher"] / max(hybrid, 1e-12)


def measured_speedup(hybrid: nn.Module, teacher: nn.Module, resolution: int, repeats: int = 5) -> float:
    t_vit, h_vit = backbone_of(teacher), backbone_of(hybrid)
    x = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    t, h = _median_times([lambda: t_vit.forward_features(x), lambda: h_vit.forward_features(x)], repeats)
    return t / h


def budget_plan(student: nn.Module, teacher: nn.Module, errors: Sequence[float], speedup: float, resolution: int,
                *, repeats: int = 5, costs: dict[str, Any] | None = None,
                measure: Callable[[list[int]], float] | None = None) -> dict[str, Any]:
    """Choose the softmax blocks (among :func:`candidate_blocks`) for a speed-up target; returns the blocks and
    how they were chosen.

    ``costs`` (see :func:`measure_costs`, :func:`predict_speedup`) and ``measure`` (blocks -> measured
    speed-up) replace the real timings when given (tests, or a caller that measured already).
    """
    if not speedup > 0:
        raise ConfigError(f"--speed-budget must be a positive speed-up, got {speedup!r}")
    vit = backbone_of(student)
    patch = family_of(vit).patch_size(vit)
    if resolution <= 0 or resolution % patch:
        raise ConfigError(f"--speed-budget resolution {resolution} is not a multiple of the patch size {patch}")
    n = len(errors)
    if len(attention_modules(student)) != n:
        raise ConfigError(f"{n} block errors given for a {len(attention_modules(student))}-block student")
    cand = candidate_blocks(student)
    costs = costs or measure_costs(student, teacher, resolution, repeats)
    if measure is None:
        def measure(blocks: list[int]) -> float:
            return measured_speedup(make_hybrid(student, blocks).eval(), teacher, resolution, repeats)
    fits = [k for k in range(len(cand) + 1)
            if predicted_speedup(costs, cand, choose_softmax_blocks(errors, k, cand)) >= speedup]
    k = max(fits) if fits else 0
    predicted = predicted_speedup(costs, cand, choose_softmax_blocks(errors, k, cand))
    tried = []
    while True:
        blocks = choose_softmax_blocks(errors, k, cand)
        got = float(measure(blocks))
        tried.append({"k": k, "blocks": blocks, "measured_speedup": got})
        if got >= speedup or k == 0:
            break
        k -= 1
    return {"blocks": blocks, "k": k, "target_speedup": speedup, "resolution": resolution,
            "candidates": cand, "predicted_speedup": predicted, "measured_speedup": got, "met": got >= speedup,
            "costs_s": costs, "tried": tried}


def blocks_for_budget(student: nn.Module, teacher: nn.Module, errors: Sequence[float], speedup: float,
                      resolution: int, **kwargs: Any) -> list[int]:
    """The largest set of worst-error blocks kept softmax whose measured speed-up meets ``speedup``."""
    return budget_plan(student, teacher, errors, speedup, resolution, **kwargs)["blocks"]


def parse_budget(value: str) -> tuple[float, int]:
    """``2.0@896`` -> (2.0, 896)."""
    try:
        s, r = value.split("@")
        speed, res = float(s), int(r)
    except ValueError:
        raise ConfigError(f"--speed-budget expects SPEEDUP@RESOLUTION like 2.0@896 (got {value!r})") from None
    if not speed > 0 or res <= 0:
        raise ConfigError(f"--speed-budget expects a positive speed-up and resolution (got {value!r})")
    return speed, res


def hybridize(student: nn.Module, teacher: nn.Module, *, keep_worst: int | str | None = None,
              keep_blocks: Sequence[int] | None = None, speed_budget: str | None = None,
              img_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``student`` with some blocks switched back to exact softmax, and the record of how they were chosen
    (saved as ``hybrid`` in ``adala.json``).

    ``keep_worst``: that many blocks with the largest held-out attention error, or ``"auto"``: as many as
    ``speed_budget`` (``SPEEDUP@RES``) allows; ``keep_blocks``: explicit block indices. Give one of the two.
    """
    if keep_worst is not None and keep_blocks is not None:
        raise ConfigError("give either --keep-worst (count or auto) or --keep-blocks (indices), not both")
    if (keep_worst == "auto") != (speed_budget is not None):
        raise ConfigError("--keep-worst auto and --speed-budget SPEEDUP@RES go together")
    info: dict[str, Any] = {}
    blocks = list(keep_blocks or [])
    if keep_worst is not None:
        errors = block_errors(student, teacher, img_size=img_size)
        info["block_errors"] = errors
        if keep_worst == "auto":
            speed, res = parse_budget(speed_budget)
            plan = budget_plan(student, teacher, errors, speed, res)
            info["budget"] = plan
            blocks = plan["blocks"]
        else:
            blocks = choose_softmax_blocks(errors, keep_worst, candidate_blocks(student))
    info["softmax_blocks"] = blocks
    return make_hybrid(student, blocks), info
