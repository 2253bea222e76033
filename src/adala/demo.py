"""``adala demo``: the whole method on the embedded teacher (the packaged ``demo`` recipe), then a benchmark of
teacher vs student and the report, in one call."""

from __future__ import annotations

import time
from pathlib import Path

from .benchmark import bench
from .benchmark import write_json as write_bench_json
from .configs import resolve
from .files import write_json
from .recipes import run_recipe
from .report import write_report


def default_config() -> Path:
    """The packaged ``demo`` recipe: found from any directory, editable install or not."""
    return resolve("demo")


def run_demo(config: Path, out: Path, fresh: bool = False, resolutions: list[int] = (224, 448, 896),
             repeats: int = 3, memory: bool = True, pca_size: int = 896) -> Path:
    """Recipe -> bench (teacher vs the stage-2 student) -> report; returns the report path."""
    t0 = time.perf_counter()
    summary = run_recipe(config, out, fresh=fresh)
    bench_file = out / "bench.json"
    student_dir = out / "stage2"
    students = {"student": str(student_dir)}
    if (out / "agent_stage1" / "adala.json").is_file():  # the recipe's agent-attention arm, timed beside it
        students["agent"] = str(out / "agent_stage1")
    if fresh or not bench_file.is_file():
        print(f"[bench] teacher vs {', '.join(students)} at {', '.join(map(str, resolutions))} px (batch 1, CPU)")
        record = bench(summary["teacher"], students=students, resolutions=resolutions,
                       repeats=repeats, memory=memory, progress=print)
        record["command"] = f"adala bench --teacher {summary['teacher']} " \
                            + " ".join(f"--model {d}" for d in students.values()) \
                            + " --resolutions " + ",".join(map(str, resolutions))
        write_bench_json(record, bench_file)
    commands = ["make demo", f"adala demo --config {config} --out {out}"]
    report = write_report(out, commands=commands, config_text=Path(config).read_text(), pca_size=pca_size)
    write_json(out / "demo_time.json", {"wall_time_s": round(time.perf_counter() - t0, 1)})
    return report
