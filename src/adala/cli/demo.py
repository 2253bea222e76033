"""``adala demo``: the whole method on the embedded teacher, then a benchmark and the report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def default_config() -> Path:
    """The packaged ``demo`` recipe: found from any directory, editable install or not."""
    from ..configs import resolve

    return resolve("demo")


def run_demo(config: Path, out: Path, fresh: bool = False, resolutions: list[int] = (224, 448, 896),
             repeats: int = 3, memory: bool = True, pca_size: int = 896) -> Path:
    """Recipe -> bench (teacher vs the stage-2 student) -> report; returns the report path."""
    from ..benchmark import bench, write_json
    from ..recipes import run_recipe
    from ..report import write_report

    t0 = time.perf_counter()
    summary = run_recipe(config, out, fresh=fresh)
    bench_file = out / "bench.json"
    student_dir = out / "stage2"
    if fresh or not bench_file.is_file():
        print(f"[bench] teacher vs stage-2 student at {', '.join(map(str, resolutions))} px (batch 1, CPU)")
        record = bench(summary["teacher"], students={"student": str(student_dir)}, resolutions=resolutions,
                       repeats=repeats, memory=memory, progress=print)
        record["command"] = f"adala bench --teacher {summary['teacher']} --model {student_dir} --resolutions " \
                            + ",".join(map(str, resolutions))
        write_json(record, bench_file)
    commands = ["make demo", f"adala demo --config {config} --out {out}"]
    report = write_report(out, commands=commands, config_text=Path(config).read_text(), pca_size=pca_size)
    (out / "demo_time.json").write_text(json.dumps({"wall_time_s": round(time.perf_counter() - t0, 1)}) + "\n")
    return report


def _demo(args: argparse.Namespace) -> int:
    from ..configs import resolve
    from .core import parse_ints

    config = resolve(args.config) if args.config else default_config()
    report = run_demo(config, Path(args.out), args.fresh, parse_ints(args.resolutions, "--resolutions"),
                      args.repeats)
    headline = report.read_text().split("## The paper's ablation")[0].split("## Teacher vs student")[-1]
    print("\nTeacher vs student" + headline.rstrip())
    print(f"\nreport: {report}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole method on the embedded teacher and write a report")
    p.add_argument("--config", default=None, help="recipe file or packaged name (default: the packaged demo)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--fresh", action="store_true", help="rerun every stage instead of reusing finished ones")
    p.add_argument("--resolutions", default="224,448,896", help="benchmark resolutions")
    p.add_argument("--repeats", type=int, default=3, help="benchmark repeats per resolution")
    p.set_defaults(func=_demo)
