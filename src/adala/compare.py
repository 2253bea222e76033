"""``compare``: one recipe, one budget, several attention kinds, one table.

Each kind runs the same recipe (only the linearize stage's ``attention`` and the teacher are overridden)
into ``OUT/<kind>/``; the final students are then benched together against the teacher in *one*
interleaved bench run, so load from elsewhere hits every kind alike. ``OUT/compare.json`` holds the rows
(and the full bench record), ``OUT/compare.md`` the table, ``OUT/compare.png`` quality vs speed-up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import attention
from .benchmark import bench
from .errors import ConfigError
from .files import atomic_write_text, write_json
from .models import load_model, load_teacher
from .models.surgery import attention_modules
from .plotting import plot_compare
from .recipes import Recipe, load_recipe, run_recipe

QUALITY_STAGES = ("align-features", "align-attention", "linearize")  # the final student: last of the first kind


def _check_kinds(kinds: Sequence[str] | str) -> list[str]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = list(kinds)
    if not kinds:
        raise ConfigError("--attention: give at least one attention kind")
    known = attention.available()
    for k in kinds:
        if k not in known:
            raise ConfigError(f"unknown attention kind {k!r} (known: {', '.join(known)})")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"--attention lists a kind twice: {kinds}")
    return kinds


def _attention_override(recipe: Recipe) -> str:
    """The recipe key that picks the attention kind: the linearize stage (or a self-linearizing stage 1)."""
    for st in recipe.stages:
        if st.kind == "linearize":
            return f"stages.{st.name}.attention"
    for st in recipe.stages:
        if st.kind == "align-attention" and st.source is None:
            return f"stages.{st.name}.attention"
    raise ConfigError(f"recipe {recipe.source}: no linearize stage whose attention kind compare could set")


def _ancestors(stages: list, name: str) -> list[str]:
    by_name = {st.name: st for st in stages}
    chain = []
    while name in by_name and by_name[name].source not in (None, "teacher"):
        name = by_name[name].source
        chain.append(name)
    return chain


def _final_student(recipe: Recipe) -> str:
    """The student the table is about: of the first kind in QUALITY_STAGES, the stage with the longest chain
    of stages behind it (so stage 1 -> stage 2 wins over an ablation's stage 2 straight from linearize)."""
    for kind in QUALITY_STAGES:
        cands = [(len(_ancestors(recipe.stages, st.name)), i, st.name)
                 for i, st in enumerate(recipe.stages) if st.kind == kind]
        if cands:
            return max(cands)[2]
    raise ConfigError(f"recipe {recipe.source}: no stage produces a student to compare")


def _needed_stages(stages: list, final: str) -> list:
    """What the table needs: the final student's chain, the stages that start from it, the teacher's own."""
    keep = {final, *_ancestors(stages, final)}
    return [st for st in stages if st.name in keep or st.source in (final, "teacher")]


def _quality(recipe: Recipe, summary: dict, final: str) -> dict[str, float | None]:
    """Probe top-1 (a linear probe before a full fine-tune), mIoU and final-token cosine of the stages that
    start from the final student."""
    metrics = {e["name"]: e.get("metrics") or {} for e in summary["stages"]}
    got: dict[str, float | None] = {"probe_top1": None, "miou": None, "final_cosine": None}
    probe_task = None
    for st in recipe.stages:
        if st.source != final:
            continue
        m = metrics.get(st.name, {})
        task = st.options.get("task")
        if st.kind == "finetune" and task in ("linear-probe", "classification") and "top1" in m:
            if got["probe_top1"] is None or (task == "linear-probe" and probe_task != "linear-probe"):
                got["probe_top1"], probe_task = float(m["top1"]), task
        if st.kind == "finetune" and task == "segmentation" and "miou" in m:
            got["miou"] = float(m["miou"])
        if st.kind == "evaluate" and isinstance(m.get("fidelity"), dict):
            got["final_cosine"] = float(m["fidelity"]["final_cosine"])
    return got


def _teacher_probe(recipe: Recipe, summary: dict) -> float | None:
    """Top-1 of a linear probe run on the teacher itself (the recipe's reference), if there is one."""
    metrics = {e["name"]: e.get("metrics") or {} for e in summary["stages"]}
    for st in recipe.stages:
        if st.source == "teacher" and st.kind == "finetune" and st.options.get("task") == "linear-probe":
            if "top1" in metrics.get(st.name, {}):
                return float(metrics[st.name]["top1"])
    return None


def _without_teacher_leaves(stages: list) -> list:
    """The stages minus those run on the teacher itself that no other stage starts from."""
    used = {st.source for st in stages}
    return [st for st in stages if not (st.source == "teacher" and st.name not in used)]


def param_counts(student, teacher) -> dict[str, int]:
    """Total parameters; those beyond the teacher's (new kernel parameters); those stage 1 trains."""
    t_keys = set(teacher.state_dict())
    named = dict(student.named_parameters())
    extra = sum(p.numel() for n, p in named.items() if n not in t_keys and n.removeprefix("backbone.") not in t_keys)
    attn = sum(p.numel() for m in attention_modules(student) for p in m.parameters())
    return {"params_total": sum(p.numel() for p in named.values()), "params_extra": extra,
            "params_attention": attn}


def compare(
    teacher: str | None,
    kinds: Sequence[str] | str,
    recipe: str | os.PathLike,
    out: str | os.PathLike,
    overrides: Iterable[str] = (),
    resolutions: Sequence[int] = (224, 896),
    *,
    repeats: int = 3,
    memory: bool = False,
    fresh: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run ``recipe`` once per attention kind, bench the final students together, write the table."""
    say = log or (lambda _m: None)
    kinds = _check_kinds(kinds)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    base = [*overrides] + ([f"teacher={json.dumps(str(teacher))}"] if teacher else [])
    parsed = load_recipe(recipe, base)  # validated once, before any kind runs
    key = _attention_override(parsed)
    final = _final_student(parsed)
    runs = {}
    for kind in kinds:
        say(f"== {kind}: {recipe} -> {out / kind}")
        sets = [*base, f"{key}={kind}"]
        r = load_recipe(recipe, sets)
        r = replace(r, stages=_needed_stages(r.stages, final))  # e.g. a recipe's ablation arms are left out
        if runs:  # the teacher's own stages do not depend on the kind: run them for the first kind only
            r = replace(r, stages=_without_teacher_leaves(r.stages))
        runs[kind] = (r, run_recipe(r, out / kind, fresh=fresh, log=log))
    say(f"== bench {', '.join(kinds)} vs teacher at {', '.join(map(str, resolutions))}px")
    t_model = load_teacher(parsed.teacher)
    record = bench(t_model, {k: str(out / k / final) for k in kinds}, resolutions=list(resolutions),
                   repeats=repeats, memory=memory, progress=say)
    res_list = record["settings"]["resolutions"]
    rows = []
    for kind in kinds:
        r, summary = runs[kind]
        row: dict[str, Any] = {"kind": kind, "student": str(out / kind / final), **_quality(r, summary, final)}
        for res in res_list:
            s = next(x for x in record["results"] if x["model"] == kind and x["resolution"] == res)
            c = next(x for x in record["comparisons"] if x["student"] == kind and x["resolution"] == res)
            row[f"images_per_s@{res}"] = s["images_per_s"]
            row[f"speedup@{res}"] = c["speedup"]
        row.update(param_counts(load_model(out / kind / final), t_model))
        rows.append(row)
    t_row = {"kind": "teacher", **{f"images_per_s@{x['resolution']}": x["images_per_s"]
                                   for x in record["results"] if x["model"] == "teacher"},
             **{f"speedup@{r}": 1.0 for r in res_list}, "params_total": sum(p.numel() for p in t_model.parameters()),
             "probe_top1": _teacher_probe(parsed, runs[kinds[0]][1])}
    result = {"format": "adala-compare/1", "teacher": parsed.teacher, "recipe": str(recipe),
              "overrides": list(overrides), "final_stage": final, "kinds": kinds, "resolutions": res_list,
              "columns": columns(res_list), "rows": rows, "teacher_row": t_row, "bench": record}
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot_compare(result, out / "compare.png"))
    write_json(out / "compare.json", result, sort_keys=False)
    atomic_write_text(out / "compare.md", to_markdown(result))
    say(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return result


def columns(resolutions: Sequence[int]) -> list[str]:
    per_res = [c for r in resolutions for c in (f"images_per_s@{r}", f"speedup@{r}")]
    return ["kind", "probe_top1", "miou", "final_cosine", *per_res, "params_extra", "params_attention",
            "params_total"]


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "—"
    if col.startswith("params"):
        return f"{v:,}"
    if col.startswith("speedup"):
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.4f}" if col in ("probe_top1", "miou", "final_cosine") else f"{v:.2f}"
    return str(v)


def to_markdown(result: dict[str, Any]) -> str:
    cols = result["columns"]
    lines = [f"# adala compare: {', '.join(result['kinds'])}", "",
             f"teacher `{result['teacher']}`, recipe `{result['recipe']}`, student = stage "
             f"`{result['final_stage']}`; speed-up = teacher latency / student latency (one interleaved bench run,"
             f" median of {result['bench']['settings']['repeats']}).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in [*result["rows"], result["teacher_row"]]:
        lines.append("| " + " | ".join(_fmt(c, row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
