"""PNG of a bench record: images/s, peak memory and speed-up vs resolution, crossover marked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_bench(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Three panels: throughput (log), peak memory, speed-up next to the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..models.weights import atomic_write

    names = [m["name"] for m in record["models"]]
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax_ips, ax_mem, ax_sp = axes
    for name in names:
        rows = sorted((r for r in record["results"] if r["model"] == name), key=lambda r: r["resolution"])
        res = [r["resolution"] for r in rows]
        style = dict(marker="o", linestyle="-" if name == "teacher" else "--", color=colour[name])
        ax_ips.plot(res, [r["images_per_s"] for r in rows], label=name, **style)
        mem = [(r["resolution"], r["peak_memory_mb"]) for r in rows if r["peak_memory_mb"] is not None]
        if mem:
            ax_mem.plot(*zip(*mem), label=name, **style)
    for j, name in enumerate(names[1:]):
        comps = sorted((c for c in record["comparisons"] if c["student"] == name), key=lambda c: c["resolution"])
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
    fig.tight_layout()
    out = Path(path)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return out
