"""The demo report: Markdown + PNGs built only from a run's JSON outputs (and its saved models for figures).

Every number printed in ``report.md`` goes through :class:`Numbers`, which records the JSON file and key path
it came from in ``report_sources.json``; the tests re-read each source and check the printed value.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, plotting
from .data.photos import HELDOUT_PHOTOS, load_photo
from .evaluation.fidelity import fidelity
from .files import write_json
from .models import load_model, load_teacher
from .train.logs import read_log

PAPER_ABLATION = {"none": 22.92, "stage 1 only": 19.37, "stage 2 only": 52.46, "stage 1 + 2": 55.55}
# demo recipe stage names: ablation arm -> (model stage, probe stage, segmentation stage)
# ablation arm -> its held-out fidelity stage (evaluated at several sizes: the fidelity-vs-resolution curve)
FIDELITY_STAGES = {"none": "fidelity_none", "stage 1 only": "fidelity_stage1", "stage 1 + 2": "fidelity",
                   "agent attention, stage 1 (224²)": "fidelity_agent"}
ARMS = {
    "none": ("student", "probe_none", "seg_none"),
    "stage 1 only": ("stage1", "probe_stage1", "seg_stage1"),
    "stage 2 only": ("stage2_only", "probe_stage2_only", "seg_stage2_only"),
    "stage 1 + 2": ("stage2", "probe", "segmentation"),
}


class Numbers:
    """Formats numbers for the report and remembers where each one came from."""

    def __init__(self, root: Path):
        self.root = root
        self.sources: list[dict[str, Any]] = []
        self._cache: dict[str, Any] = {}

    def _load(self, file: str) -> Any:
        if file not in self._cache:
            self._cache[file] = json.loads((self.root / file).read_text())
        return self._cache[file]

    def get(self, file: str, path: Sequence[Any]) -> Any:
        value: Any = self._load(file)
        for key in path:
            value = value[key]
        return value

    def fmt(self, file: str, path: Sequence[Any], spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
        """The value at ``file``/``path`` formatted; '—' when the run did not produce it."""
        try:
            value = self.get(file, path)
        except (FileNotFoundError, KeyError, IndexError, TypeError):
            return "—"
        text = format(float(value) * scale, spec)
        self.sources.append({"file": file, "path": list(path), "spec": spec, "scale": scale, "text": text})
        return text + suffix


def stage_index(summary: dict) -> dict[str, int]:
    return {s["name"]: i for i, s in enumerate(summary["stages"])}


def _metric_path(summary: dict, stage: str, *keys: str) -> list[Any] | None:
    idx = stage_index(summary)
    if stage not in idx:
        return None
    return ["stages", idx[stage], "metrics", *keys]


def _loss_curve(run: Path, stage: str) -> tuple[list[int], list[float]]:
    rows = [r for r in read_log(run / stage) if "loss" in r and "step" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _bench_rows(bench: dict) -> list[dict]:
    return list(bench.get("results", []))


def write_report(run: str | Path, *, bench_file: str = "bench.json", photos: int = 3, pca_size: int = 896,
                 commands: Sequence[str] = (), config_text: str | None = None) -> Path:
    """Write ``run/report.md`` and its PNGs from ``run/summary.json`` (+ ``run/<bench_file>``)."""
    run = Path(run)
    summary = json.loads((run / "summary.json").read_text())
    nums = Numbers(run)
    S = "summary.json"
    idx = stage_index(summary)
    lines: list[str] = ["# adala demo report", ""]
    lines += [f"Teacher `{summary['teacher']}`, student attention `linear-elu`, images {summary['img_size']}², "
              f"seed {summary['seed']}. Every number below is read from this run's JSON files "
              "(`summary.json`, `bench.json`); `report_sources.json` says which key each came from.", ""]

    # 1. headline
    bench = json.loads((run / bench_file).read_text()) if (run / bench_file).is_file() else None
    lines += ["## Teacher vs student (stage 1 + 2)", "", "| metric | teacher | student | ratio |", "|---|---|---|---|"]

    def pair_row(label: str, t_stage: str, s_stage: str, key: str, scale: float = 100.0, spec: str = ".2f"):
        tp, sp = _metric_path(summary, t_stage, key), _metric_path(summary, s_stage, key)
        if tp is None or sp is None:
            return
        t, s = nums.fmt(S, tp, spec, scale), nums.fmt(S, sp, spec, scale)
        try:
            ratio = f"{float(s) / float(t) * 100:.1f} %"
        except (ValueError, ZeroDivisionError):
            ratio = "—"
        lines.append(f"| {label} | {t} | {s} | {ratio} |")

    pair_row("Fashion-MNIST linear probe top-1 (%)", "probe_teacher", "probe", "top1")
    ft = _metric_path(summary, "finetune", "steps")
    if ft:  # a CPU-sized fine-tune is short: say how short, next to the number
        steps = nums.fmt(S, ft, ".0f")
        pair_row(f"Fashion-MNIST full fine-tune top-1 (%), {steps} steps", "finetune_teacher", "finetune", "top1")
    pair_row("Fashion-MNIST-seg mIoU (%)", "seg_teacher", "segmentation", "miou")
    fp = _metric_path(summary, "fidelity", "fidelity", "final_cosine")
    by_size = _metric_path(summary, "fidelity", "by_size")
    try:
        sizes = sorted(nums.get(S, by_size), key=int) if by_size else []
    except (KeyError, IndexError, TypeError):
        sizes = []
    if sizes:
        for size in sizes:
            cos = nums.fmt(S, [*by_size, size, "fidelity", "final_cosine"], ".4f")
            lines.append(f"| final-token cosine to teacher (held-out photos, {size}²) | 1 | {cos} | |")
    if fp and not sizes:
        size = nums.fmt(S, _metric_path(summary, "fidelity", "img_size"), ".0f")
        lines.append(f"| final-token cosine to teacher (held-out photos, {size}²) | 1 | {nums.fmt(S, fp, '.4f')} | |")
    if bench:
        rows = _bench_rows(bench)
        res = sorted({r["resolution"] for r in rows})
        for r in (res[0], res[-1]) if res else ():
            ti = next(i for i, x in enumerate(rows) if x["resolution"] == r and x["model"] == "teacher")
            t = nums.fmt(bench_file, ["results", ti, "images_per_s"], ".2f")
            for si, row in enumerate(rows):  # the stage-2 student, then any other timed student (the agent arm)
                if row["resolution"] != r or row["model"] == "teacher":
                    continue
                ci = next(i for i, c in enumerate(bench["comparisons"])
                          if c["resolution"] == r and c["student"] == row["model"])
                s = nums.fmt(bench_file, ["results", si, "images_per_s"], ".2f")
                sp = nums.fmt(bench_file, ["comparisons", ci, "speedup"], ".2f", suffix="×")
                who = "" if row["model"] == "student" else f", {row['model']}"
                lines.append(f"| throughput at {r}² (images/s, batch 1, CPU{who}) | {t} | {s} | {sp} |")
    lines.append("")

    # 2. ablation
    lines += ["## The paper's ablation on our data", "",
              "| alignment | probe top-1 (%) | mIoU (%) | paper ADE20K mIoU (DINOv2-L) |", "|---|---|---|---|"]
    for arm, (_, probe, seg) in ARMS.items():
        pp, sp = _metric_path(summary, probe, "top1"), _metric_path(summary, seg, "miou")
        p = nums.fmt(S, pp, ".2f", 100.0) if pp else "—"
        m = nums.fmt(S, sp, ".2f", 100.0) if sp else "—"
        lines.append(f"| {arm} | {p} | {m} | {PAPER_ABLATION[arm]} |")
    lines.append("")

    # 2b. fidelity vs resolution on held-out photos
    res_curves: dict[str, dict[str, list]] = {}
    table: list[str] = []
    for arm, stage in FIDELITY_STAGES.items():
        bp = _metric_path(summary, stage, "by_size")
        if bp is None:
            continue
        try:
            by_size = nums.get(S, bp)
        except (KeyError, IndexError, TypeError):
            continue
        sizes = sorted(by_size, key=int)
        d: dict[str, list] = {"sizes": [int(x) for x in sizes]}
        cells = []
        for key in ("final_cosine", "cls_cosine", "structure_k10"):
            d[key] = [float(by_size[x]["fidelity"][key]) for x in sizes]
        for x in sizes:
            f = [nums.fmt(S, [*bp, x, "fidelity", key], ".3f") for key in ("final_cosine", "cls_cosine",
                                                                              "structure_k10")]
            cells.append(" / ".join(f))
        res_curves[arm] = d
        table.append(f"| {arm} | " + " | ".join(cells) + " |")
    if res_curves:
        sizes = next(iter(res_curves.values()))["sizes"]
        plotting.fidelity_vs_resolution(res_curves, run / "fidelity_resolution.png")
        lines += ["## Fidelity vs resolution (held-out photos: sources no stage trained on)", "",
                  "token cosine / CLS cosine / patch-structure agreement (k = 10) to the teacher:", "",
                  "| student | " + " | ".join(f"{x}²" for x in sizes) + " |",
                  "|---|" + "---|" * len(sizes), *table, "",
                  "![fidelity vs resolution](fidelity_resolution.png)", ""]

    # 3. loss curves
    curves = {}
    if "stage2" in idx:
        curves["stage 2 after stage 1"] = _loss_curve(run, "stage2")
    if "stage2_only" in idx:
        curves["stage 2 from the plain swap"] = _loss_curve(run, "stage2_only")
    if any(c[0] for c in curves.values()):
        plotting.loss_curves(curves, run / "loss_curves.png", "Stage 2 with and without stage-1 initialisation")
        lines += ["## Stage-2 loss with and without stage 1", "", "![stage-2 loss](loss_curves.png)", ""]

    # 4-5. figures that need the models: per-layer fidelity and feature PCA on real photos
    teacher = load_teacher(summary["teacher"])
    patch = teacher.adala_config["patch_size"]
    names = list(HELDOUT_PHOTOS)[:photos]  # held-out photos, at the size where the speed-up is
    mean = torch.tensor(teacher.adala_config["mean"]).view(3, 1, 1)
    std = torch.tensor(teacher.adala_config["std"]).view(3, 1, 1)
    display, tensors = [], []
    for name in names:
        img = load_photo(name).convert("RGB")
        side = min(img.size)
        img = img.crop(((img.width - side) // 2, (img.height - side) // 2,
                        (img.width + side) // 2, (img.height + side) // 2)).resize((pca_size, pca_size))
        display.append(img)
        t = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32") / 255.0).permute(2, 0, 1)
        tensors.append((t - mean) / std)
    x = torch.stack(tensors)
    small = torch.nn.functional.interpolate(x, size=(summary["img_size"],) * 2, mode="bilinear", antialias=True)
    per_model, models = {}, {"teacher (softmax)": teacher}
    for arm, (stage, _, _) in ARMS.items():
        if stage in idx and (run / stage / "adala.json").is_file():
            m = load_model(run / stage)
            fid = fidelity(m, teacher, [small])
            per_model[arm] = {"attn_rel_err": fid["attn_rel_err"],
                              "token_cosine": plotting.block_token_cosine(m, teacher, small)}
            if arm in ("none", "stage 1 + 2"):
                models[f"student: {arm}"] = m
    if per_model:
        plotting.layer_fidelity(per_model, run / "layer_fidelity.png")
        lines += ["## Per-layer fidelity", "", "![per-layer fidelity](layer_fidelity.png)", ""]
    plotting.feature_pca(models, x, display, patch, run / "feature_pca.png")
    lines += ["## Feature maps (PCA of final patch tokens, first three components as RGB)", "",
              f"{pca_size}² inputs of held-out photos; one PCA basis fitted on the teacher's tokens and applied "
              "to every model.", "",
              "![feature PCA](feature_pca.png)", ""]

    # 6. throughput
    if bench:
        plotting.throughput(_bench_rows(bench), run / "throughput.png")
        lines += ["## Throughput and memory vs resolution", "", "![throughput](throughput.png)", "",
                  f"Measured with `{bench.get('command', 'adala bench')}`; memory: "
                  f"{bench.get('settings', {}).get('memory_method') or 'not measured'}.",
                  ""]

    # 7. provenance
    lines += ["## How this was produced", "", "| stage | kind | from | wall time (s) |", "|---|---|---|---|"]
    for i, st in enumerate(summary["stages"]):
        w = nums.fmt(S, ["stages", i, "wall_time_s"], ".1f")
        lines.append(f"| {st['name']} | {st['kind']} | {st.get('from', '')} | {w} ({st.get('status', 'ran')}) |")
    lines += ["", f"adala {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
              f"{platform.machine()}, {torch.get_num_threads()} threads; seed {summary['seed']}.", ""]
    if commands:
        lines += ["Commands:", "", "```bash", *commands, "```", ""]
    if config_text:
        lines += ["Recipe:", "", "```yaml", config_text.rstrip(), "```", ""]
    (run / "report.md").write_text("\n".join(lines))
    write_json(run / "report_sources.json", nums.sources, indent=1, sort_keys=False)
    return run / "report.md"
