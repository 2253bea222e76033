"""``adala teachers`` and ``adala linearize``."""

from __future__ import annotations

import argparse

from .. import attention


def _teachers(args: argparse.Namespace) -> int:
    from ..models.teachers import EMBEDDED, teacher_forms

    print("built-in teachers:")
    for name, desc in EMBEDDED.items():
        print(f"  {name:<22} {desc}")
    print("accepted forms of --teacher:")
    for form, desc in teacher_forms():
        print(f"  {form:<22} {desc}")
    print("attention kinds: " + ", ".join(attention.available()))
    return 0


def parse_options(items: list[str] | None) -> dict:
    """``--option key=value`` pairs; values parsed as YAML scalars (numbers, booleans)."""
    import yaml

    from ..errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--option expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def parse_keep(value: str | None) -> list[int] | None:
    from ..errors import ConfigError

    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--keep-softmax expects block indices like 0,11 (got {value!r})") from None


def _linearize(args: argparse.Namespace) -> int:
    from .. import linearize, load_teacher, save_model

    teacher = load_teacher(args.teacher, allow_pickle=args.allow_pickle)
    student = linearize(teacher, args.attention, keep_softmax=parse_keep(args.keep_softmax),
                        **parse_options(args.option))
    out = save_model(student, args.out)
    n = sum(p.numel() for p in student.parameters())
    print(f"wrote {out} ({args.attention}, {n / 1e6:.2f}M parameters)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teachers", help="list built-in teachers and accepted --teacher forms")
    p.set_defaults(func=_teachers)

    p = sub.add_parser("linearize", help="swap a teacher's softmax attention for linear attention")
    p.add_argument("--teacher", default="dinov2-s14", help="teacher spec (see 'adala teachers')")
    p.add_argument("--attention", default="linear-elu", help="attention kind")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="attention option (repeatable)")
    p.add_argument("--keep-softmax", default=None, metavar="I,J", help="blocks that keep exact softmax")
    p.add_argument("--allow-pickle", action="store_true", help="allow .pt/.pth/.bin teacher weights")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_linearize)
