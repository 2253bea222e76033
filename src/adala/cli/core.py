"""``adala teachers`` and ``adala linearize``."""

from __future__ import annotations

import argparse
import sys

from .. import attention


def _teachers(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..models.families import families
    from ..models.teachers import ALIASES, EMBEDDED, teacher_forms

    print("built-in teachers:")
    for name, desc in EMBEDDED.items():
        print(f"  {name:<22} {desc}")
    print("supported model families (one example --teacher each):")
    for fam in families():
        print(f"  {fam.name:<6} {fam.example:<40} {fam.description}")
    print("aliases (timm hub names; weights need the hub):")
    for name, target in ALIASES.items():
        print(f"  {name:<22} timm:{target}")
    print("accepted forms of --teacher:")
    for form, desc in teacher_forms():
        print(f"  {form:<22} {desc}")
    print("attention kinds: " + ", ".join(attention.available()))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..configs import describe, packaged

    print("packaged recipes (adala run NAME, adala compare --recipe NAME):")
    for name, path in packaged().items():
        print(f"  {name:<20} {describe(path)}")
    return 0


def parse_options(items: list[str] | None) -> dict:
    """``--option key=value`` pairs; values parsed as YAML scalars (numbers, booleans)."""
    # lazy: keeps adala --help fast (no training code at parse time)
    import yaml

    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--option expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def parse_keep(value: str | None, flag: str = "--keep-softmax") -> list[int] | None:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError

    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects block indices like 0,11 (got {value!r})") from None


def _linearize(args: argparse.Namespace) -> int:
    # lazy: adala --help loads no model code
    from ..errors import ConfigError
    from ..hybrid import hybridize
    from ..models import linearize, load_model, load_teacher, save_model

    keep_blocks = parse_keep(args.keep_blocks, "--keep-blocks")
    count, flag = args.keep_worst, "--keep-worst"
    if args.keep_softmax is not None:  # before 0.2 linearize's --keep-softmax was this count (bench's: indices)
        if count is not None:
            raise ConfigError("give --keep-worst, not also its deprecated spelling --keep-softmax")
        count, flag = args.keep_softmax, "--keep-softmax"
    if count is not None and count != "auto":
        try:
            count = int(count)
        except ValueError:
            raise ConfigError(f"{flag} expects a block count or 'auto' (got {count!r}); "
                              "give block indices with --keep-blocks") from None
    if count is not None and keep_blocks is not None:
        raise ConfigError(f"give either {flag} (count or auto) or --keep-blocks (indices), not both")
    if (count == "auto") != (args.speed_budget is not None):
        raise ConfigError(f"{flag} auto and --speed-budget SPEEDUP@RES go together")
    if flag == "--keep-softmax":
        print("warning: linearize --keep-softmax K|auto is deprecated; use --keep-worst K|auto", file=sys.stderr)
    teacher = load_teacher(args.teacher, allow_pickle=args.allow_pickle)
    if args.student:
        student = load_model(args.student)
    else:
        student = linearize(teacher, args.attention, keep_softmax=keep_blocks, **parse_options(args.option))
    extra = None
    if count is not None or (args.student and keep_blocks is not None):
        student, info = hybridize(student, teacher, keep_worst=count, keep_blocks=None if count is not None
                                  else keep_blocks, speed_budget=args.speed_budget, img_size=args.img_size)
        plan = info.get("budget")
        if plan and not plan["met"]:
            print(f"warning: even the fully linear student measured {plan['measured_speedup']:.2f}x "
                  f"< {plan['target_speedup']}x at {plan['resolution']}px")
        extra = {"hybrid": {"student": args.student, **info}}
        print("softmax blocks: " + (",".join(map(str, info["softmax_blocks"])) or "none"))
    out = save_model(student, args.out, extra=extra)
    n = sum(p.numel() for p in student.parameters())
    kind = student.adala_config["attention"]["kind"]
    print(f"wrote {out} ({kind}, {n / 1e6:.2f}M parameters)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teachers", help="list built-in teachers and accepted --teacher forms")
    p.set_defaults(func=_teachers)

    p = sub.add_parser("recipes", help="list the recipes shipped with adala (run them by name: adala run demo)")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("linearize", help="swap a teacher's softmax attention for linear attention")
    p.add_argument("--teacher", default="dinov2-s14", help="teacher spec (see 'adala teachers')")
    p.add_argument("--attention", default="linear-elu", help="attention kind (see 'adala teachers')")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="attention option (repeatable; default: the kind's defaults)")
    p.add_argument("--student", default=None, metavar="DIR",
                   help="start from this linearized student (e.g. a stage-1 output) instead of a fresh swap "
                        "(default: swap the teacher)")
    p.add_argument("--keep-worst", default=None, metavar="K|auto",
                   help="keep exact softmax in the K blocks with the largest attention error (held-out photos); "
                        "auto: as many as --speed-budget allows (default: none)")
    p.add_argument("--keep-softmax", default=None, metavar="K|auto",
                   help="deprecated spelling of --keep-worst (default: none)")
    p.add_argument("--speed-budget", default=None, metavar="SPEEDUP@RES",
                   help="with --keep-worst auto: minimum speed-up vs the teacher at RES px, e.g. 2.0@896 "
                        "(default: none)")
    p.add_argument("--keep-blocks", default=None, metavar="I,J",
                   help="block indices that keep exact softmax (default: none)")
    p.add_argument("--img-size", type=int, default=None, help="image size for the block errors (default: teacher's)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .pt/.pth/.bin teacher weights")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_linearize)


def parse_ints(value: str, flag: str) -> list[int]:
    """``224,448`` -> [224, 448]; a one-line error naming the flag otherwise."""
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError

    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers (got {value!r})") from None
    if not out or any(v <= 0 for v in out):
        raise ConfigError(f"{flag} expects positive integers (got {value!r})")
    return out
