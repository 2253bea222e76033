"""``adala compare``: one recipe per attention kind, benched together, one table."""

from __future__ import annotations

import argparse


def _compare(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..compare import compare
    from .core import parse_ints

    result = compare(args.teacher, args.attention, args.recipe, args.out, overrides=args.set,
                     resolutions=parse_ints(args.resolutions, "--resolutions"), repeats=args.repeats,
                     memory=args.memory, fresh=args.fresh, log=None if args.quiet else print)
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..compare import to_markdown

    print(to_markdown(result), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run one recipe per attention kind and compare quality vs speed")
    p.add_argument("--teacher", default=None, help="teacher spec (default: the recipe's)")
    p.add_argument("--attention", required=True, metavar="KIND,KIND",
                   help="attention kinds to compare, e.g. linear-elu,hedgehog,nystrom")
    p.add_argument("--recipe", default="demo",
                   help="recipe file or packaged name run for every kind (default demo; see 'adala recipes')")
    p.add_argument("--out", required=True, help="output directory (one sub-directory per kind)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every kind, e.g. stages.stage1.steps=2 (repeatable; default: "
                        "none)")
    p.add_argument("--resolutions", default="224,896", help="bench resolutions (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per model and resolution")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (slower)")
    p.add_argument("--fresh", action="store_true", help="re-run every stage, ignoring finished ones")
    p.add_argument("--quiet", action="store_true", help="only print the table")
    p.set_defaults(func=_compare)
