"""Budgeted hybrids: keep exact softmax in the blocks a linear student reproduces worst.

Not every block linearizes equally well; a few blocks carry most of the attention error. Switching
just those back to softmax (with the student's own, possibly stage-1-trained, q/k/v/proj) recovers
quality at a cost that grows with the number of softmax blocks. ``blocks_for_budget`` picks how many
fit a speed-up target: it times one softmax and one linear attention at the target resolution, predicts
the whole model as ``non-attention + k * t_softmax + (n - k) * t_linear``, and confirms the chosen k
with one real measurement, stepping down while it misses.
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


def choose_softmax_blocks(errors: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest errors, in block order."""
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(errors):
        n = len(errors)
        raise ConfigError(f"--keep-softmax {k!r} is out of range: the model has {n} blocks (0..{n})")
    worst = sorted(range(len(errors)), key=lambda i: (-errors[i], i))[:k]
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


def measure_costs(student: nn.Module, teacher: nn.Module, resolution: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the teacher forward and of one softmax vs one linear attention at ``resolution``."""
    t_vit, s_vit = backbone_of(teacher), backbone_of(student)
    x = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    tokens = t_vit.num_prefix_tokens + (resolution // t_vit.patch_embed.patch_size[0]) ** 2
    h = torch.randn(1, tokens, t_vit.embed_dim, generator=torch.Generator().manual_seed(1))
    t_attn = attention_modules(t_vit)[0]
    lin = linear_blocks(s_vit)
    s_attn = attention_modules(s_vit)[lin[0] if lin else 0]
    total, soft, linear = _median_times(
        [lambda: t_vit.forward_features(x), lambda: t_attn(h), lambda: s_attn(h)], repeats)
    return {"teacher": total, "softmax": soft, "linear": linear}


def measured_speedup(hybrid: nn.Module, teacher: nn.Module, resolution: int, repeats: int = 5) -> float:
    t_vit, h_vit = backbone_of(teacher), backbone_of(hybrid)
    x = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    t, h = _median_times([lambda: t_vit.forward_features(x), lambda: h_vit.forward_features(x)], repeats)
    return t / h


def budget_plan(student: nn.Module, teacher: nn.Module, errors: Sequence[float], speedup: float, resolution: int,
                *, repeats: int = 5, costs: dict[str, float] | None = None,
                measure: Callable[[list[int]], float] | None = None) -> dict[str, Any]:
    """Choose the softmax blocks for a speed-up target; returns the blocks and how they were chosen.

    ``costs`` (see :func:`predict_speedup`) and ``measure`` (blocks -> measured speed-up) replace the
    real timings when given (tests, or a caller that measured already).
    """
    if not speedup > 0:
        raise ConfigError(f"--speed-budget must be a positive speed-up, got {speedup!r}")
    patch = backbone_of(student).patch_embed.patch_size[0]
    if resolution <= 0 or resolution % patch:
        raise ConfigError(f"--speed-budget resolution {resolution} is not a multiple of the patch size {patch}")
    n = len(errors)
    if len(attention_modules(student)) != n:
        raise ConfigError(f"{n} block errors given for a {len(attention_modules(student))}-block student")
    costs = costs or measure_costs(student, teacher, resolution, repeats)
    if measure is None:
        def measure(blocks: list[int]) -> float:
            return measured_speedup(make_hybrid(student, blocks).eval(), teacher, resolution, repeats)
    k = largest_k(costs, n, speedup)
    predicted = predict_speedup(costs, n, k)
    tried = []
    while True:
        blocks = choose_softmax_blocks(errors, k)
        got = float(measure(blocks))
        tried.append({"k": k, "blocks": blocks, "measured_speedup": got})
        if got >= speedup or k == 0:
            break
        k -= 1
    return {"blocks": blocks, "k": k, "target_speedup": speedup, "resolution": resolution,
            "predicted_speedup": predicted, "measured_speedup": got, "met": got >= speedup,
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
            blocks = choose_softmax_blocks(errors, keep_worst)
    info["softmax_blocks"] = blocks
    return make_hybrid(student, blocks), info
