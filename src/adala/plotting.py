"""The demo report's figures. Each takes plain numbers (or models) and writes one PNG (matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path, title: str) -> Path:
    """Stage-2 loss vs step for each initialisation (log scale: the gap is what matters)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
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
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, title) in zip(axes, keys):
        for label, d in curves.items():
            ax.plot(d["sizes"], d[key], marker="o", label=label)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(next(iter(curves.values()))["sizes"]))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
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
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)
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
    """Images/s and peak memory vs resolution for each model, with the speed crossover marked."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
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
        faster = [r["resolution"] for r in sorted(rows, key=lambda r: r["resolution"])
                  if r["model"] == m and r["resolution"] in teacher and r["images_per_s"] > teacher[r["resolution"]]]
        if faster:
            a1.axvline(faster[0], ls="--", c="grey", lw=1)
            a1.annotate(f"faster from {faster[0]}²", (faster[0], a1.get_ylim()[1] * 0.5), fontsize=8)
            break
    a1.set(xlabel="resolution (px)", ylabel="images/s", title="throughput", yscale="log")
    a2.set(xlabel="resolution (px)", ylabel="MiB", title="peak memory")
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        if a.get_lines():
            a.legend(fontsize=8)
    return _save(fig, path)
