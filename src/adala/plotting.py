"""Every figure adala draws (report, ``adala bench --plot``, ``adala compare``), and the one crossover rule
they and the bench record share. Each figure takes plain numbers (or models) and writes one PNG
(matplotlib Agg, written atomically).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import atomic_write


def _pyplot():
    # lazy: matplotlib costs a second and tens of MB, which the bench's memory child must not measure
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib costs a second and tens of MB (the bench's memory child must not load it)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    out = Path(path)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        _pyplot().close(fig)
    return out


def crossover(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the student's speed-up (``speedup`` per ``resolution``) crosses 1, linearly interpolated between
    measured resolutions: the rule for the bench record and every figure that marks a crossover."""
    pts = sorted((c["resolution"], c["speedup"]) for c in comparisons)
    if not pts:
        return {"resolution": None, "note": "no measurements"}
    if pts[0][1] >= 1.0:
        return {"resolution": None, "below": pts[0][0], "note": "student faster at every measured resolution"}
    for (r0, s0), (r1, s1) in zip(pts, pts[1:]):
        if s0 < 1.0 <= s1:
            return {"resolution": r0 + (1.0 - s0) * (r1 - r0) / (s1 - s0), "between": [r0, r1],
                    "note": "speed-up interpolated linearly between measured resolutions"}
    return {"resolution": None, "above": pts[-1][0], "note": "teacher faster at every measured resolution"}


def loss_curves(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path, title: str) -> Path:
    """Stage-2 loss vs step for each initialisation (log scale: the gap is what matters)."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.0))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, lw=1.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("final-token MSE to teacher")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def layer_fidelity(per_model: dict[str, dict[str, Sequence[float]]], path: Path) -> Path:
    """Per block: teacher-forced attention-output relative error and free-running token cosine."""
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(10, 3.8))
    for label, d in per_model.items():
        blocks = np.arange(len(d["attn_rel_err"]))
        a1.plot(blocks, d["attn_rel_err"], marker="o", label=label)
        a2.plot(blocks, d["token_cosine"], marker="o", label=label)
    a1.set(xlabel="block", ylabel="relative error", title="attention output vs softmax (teacher-forced)")
    a2.set(xlabel="block", ylabel="cosine", title="block output tokens vs teacher")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def fidelity_vs_resolution(curves: dict[str, dict[str, Sequence[float]]], path: Path) -> Path:
    """Held-out fidelity against input size, one line per student (teacher = 1): token cosine, CLS cosine and
    patch-structure agreement side by side, since a student can hold one while losing another."""
    keys = [("final_cosine", "mean token cosine"), ("cls_cosine", "CLS cosine"),
            ("structure_k10", "patch structure (k=10 overlap)")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, title) in zip(axes, keys):
        for label, d in curves.items():
            ax.plot(d["sizes"], d[key], marker="o", label=label)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(next(iter(curves.values()))["sizes"]))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel="input size (pixels per side)", title=title, ylim=(0, 1.05))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


@torch.no_grad()
def block_token_cosine(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> list[float]:
    """Mean token cosine between each block's output in the student and the teacher (no teacher forcing)."""
    _, t_feats = teacher.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=False)
    _, s_feats = student.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=False)
    return [torch.nn.functional.cosine_similarity(s, t, dim=-1).mean().item() for s, t in zip(s_feats, t_feats)]


@torch.no_grad()
def _patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    feats = model.forward_features(x)
    return feats[:, model.num_prefix_tokens:]


@torch.no_grad()
def feature_pca(models: dict[str, nn.Module], images: torch.Tensor, display: Sequence[np.ndarray],
                patch: int, path: Path) -> Path:
    """First three principal components of the final patch tokens as RGB, one row per photo.

    The basis is fitted on the first model's (the teacher's) tokens and applied to every model, so equal
    colours mean equal features.
    """
    n, _, h, w = images.shape
    gh, gw = h // patch, w // patch
    tokens = {k: _patch_tokens(m, images) for k, m in models.items()}
    ref = next(iter(tokens.values())).reshape(-1, next(iter(tokens.values())).shape[-1])
    mean = ref.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(ref - mean, q=3, center=False)
    ref_proj = (ref - mean) @ v
    lo, hi = torch.quantile(ref_proj, 0.01, dim=0), torch.quantile(ref_proj, 0.99, dim=0)
    cols = 1 + len(models)
    fig, axes = _pyplot().subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(display[i])
        axes[i][0].set_title("photo" if i == 0 else "")
        for j, (label, tok) in enumerate(tokens.items(), start=1):
            proj = ((tok[i] - mean) @ v - lo) / (hi - lo).clamp_min(1e-6)
            axes[i][j].imshow(proj.clamp(0, 1).reshape(gh, gw, 3).numpy(), interpolation="nearest")
            if i == 0:
                axes[i][j].set_title(label, fontsize=9)
    for a in np.ravel(axes):
        a.axis("off")
    return _save(fig, path)


def throughput(rows: list[dict], path: Path) -> Path:
    """Images/s and peak memory vs resolution for each model, with the speed crossover (:func:`crossover`) marked."""
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(10, 3.8))
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "teacher", m))
    for m in models:
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["resolution"])
        res = [r["resolution"] for r in rs]
        a1.plot(res, [r["images_per_s"] for r in rs], marker="o", label=m)
        mem = [r.get("peak_memory_mb") for r in rs]
        if all(v is not None for v in mem):
            a2.plot(res, mem, marker="o", label=m)
    teacher = {r["resolution"]: r["images_per_s"] for r in rows if r["model"] == "teacher"}
    for m in models:
        if m == "teacher":
            continue
        comps = [{"resolution": r["resolution"], "speedup": r["images_per_s"] / teacher[r["resolution"]]}
                 for r in rows if r["model"] == m and r["resolution"] in teacher]
        cross = crossover(comps).get("resolution")
        if cross:
            a1.axvline(cross, ls="--", c="grey", lw=1)
            a1.annotate(f"crossover ≈{cross:.0f}px", (cross, a1.get_ylim()[1] * 0.5), fontsize=8)
            break
    a1.set(xlabel="resolution (px)", ylabel="images/s", title="throughput", yscale="log")
    a2.set(xlabel="resolution (px)", ylabel="MiB", title="peak memory")
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        if a.get_lines():
            a.legend(fontsize=8)
    return _save(fig, path)


def plot_bench(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Three panels: throughput (log), peak memory, speed-up next to the FLOP bound."""
    names = [m["name"] for m in record["models"]]
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, axes = _pyplot().subplots(1, 3, figsize=(16, 4.6))
    ax_ips, ax_mem, ax_sp = axes
    batch = record["settings"]["batch_size"]  # the first batch size; more are in the JSON

    def first_batch(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [x for x in items if x.get("batch_size", batch) == batch]

    for name in names:
        rows = sorted((r for r in first_batch(record["results"]) if r["model"] == name),
                      key=lambda r: r["resolution"])
        res = [r["resolution"] for r in rows]
        style = dict(marker="o", linestyle="-" if name == "teacher" else "--", color=colour[name])
        ax_ips.plot(res, [r["images_per_s"] for r in rows], label=name, **style)
        mem = [(r["resolution"], r["peak_memory_mb"]) for r in rows if r["peak_memory_mb"] is not None]
        if mem:
            ax_mem.plot(*zip(*mem), label=name, **style)
    for j, name in enumerate(names[1:]):
        comps = sorted((c for c in first_batch(record["comparisons"]) if c["student"] == name),
                       key=lambda c: c["resolution"])
        res = [c["resolution"] for c in comps]
        line = ax_sp.plot(res, [c["speedup"] for c in comps], marker="o", color=colour[name],
                          label=f"{name} measured")[0]
        bounds = [(c["resolution"], c["flop_bound"]) for c in comps if c["flop_bound"]]
        if bounds:
            ax_sp.plot(*zip(*bounds), linestyle=":", color=line.get_color(), label=f"{name} FLOP bound")
        cross = record.get("crossover", {}).get(name, {})
        if cross.get("resolution"):
            for ax in axes:
                ax.axvline(cross["resolution"], color=line.get_color(), alpha=0.4, linestyle="-.")
            ax_sp.annotate(f"crossover ≈{cross['resolution']:.0f}px", (cross["resolution"], 1.0),
                           textcoords="offset points", xytext=(5, 8), fontsize=8)
        elif cross.get("note"):
            ax_sp.text(0.02, 0.97 - 0.06 * j, f"{name}: {cross['note']}", transform=ax_sp.transAxes,
                       fontsize=8, va="top", color=colour[name])
    ax_sp.axhline(1.0, color="grey", linewidth=0.8)
    s = record["settings"]
    ax_ips.set(title="throughput", xlabel="resolution (px)", ylabel="images/s", yscale="log")
    ax_mem.set(title="peak memory", xlabel="resolution (px)", ylabel="MiB")
    ax_sp.set(title="speed-up over teacher", xlabel="resolution (px)", ylabel="x")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    env = record.get("environment", {})
    fig.suptitle(f"adala bench: {s['device']} {s['dtype']} batch {s['batch_size']}, "
                 f"{env.get('torch_threads', '?')} threads, median of {s['repeats']}", fontsize=10)
    return _save(fig, path)


def plot_compare(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Quality (probe top-1 when every kind has it, else final-token cosine) vs speed-up at the largest size."""
    res = max(result["resolutions"])
    rows = result["rows"]
    ykey = "probe_top1" if all(r.get("probe_top1") is not None for r in rows) else "final_cosine"
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.8))
    for i, r in enumerate(rows):
        x, y = r[f"speedup@{res}"], r.get(ykey)
        if y is None:
            continue
        ax.scatter([x], [y], s=60, color=f"C{i % 10}", label=r["kind"])
        ax.annotate(r["kind"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel=f"speed-up over teacher at {res}px", title="quality vs speed",
           ylabel="linear-probe top-1" if ykey == "probe_top1" else "final-token cosine to teacher")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)
