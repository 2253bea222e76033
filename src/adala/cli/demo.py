"""``adala demo``: the whole method on the embedded teacher, then a benchmark and the report."""

from __future__ import annotations

import argparse
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    # lazy: adala --help loads no training code
    from ..configs import resolve
    from ..demo import default_config, run_demo
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
