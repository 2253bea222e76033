"""``adala bench``: teacher vs linear students, speed/memory/FLOPs per resolution (thin layer over
``adala.benchmark.bench``)."""

from __future__ import annotations

import argparse
import sys

from .core import parse_keep, parse_options


def _ints(value: str, what: str) -> list[int]:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError

    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated integers like 224,448 (got {value!r})") from None


def format_table(record: dict) -> str:
    """One line per batch size, resolution and student: img/s, speed-up, FLOP bound, fraction, memory
    (teacher columns "-" where the teacher was not timed: ``--teacher-max-resolution``)."""
    first = record["settings"]["batch_size"]
    key = lambda r: (r.get("batch_size", first), r["resolution"])  # noqa: E731 - records before batch_sizes
    rows = {(*key(r), r["model"]): r for r in record["results"]}
    comps = {(*key(c), c["student"]): c for c in record["comparisons"]}
    lines = [f"{'batch':>5} {'res':>5} {'tokens':>6} {'student':<14} {'teacher img/s':>13} {'student img/s':>13} "
             f"{'speed-up':>8} {'bound':>6} {'of bound':>8} {'mem T/S MiB':>15}"]
    for r in record["results"]:
        if r["model"] == "teacher":
            continue
        t, c = rows.get((*key(r), "teacher")), comps.get((*key(r), r["model"]), {})
        bound = "-" if c.get("flop_bound") is None else f"{c['flop_bound']:.2f}x"
        frac = "-" if c.get("fraction_of_bound") is None else f"{100 * c['fraction_of_bound']:.0f}%"
        speed = "-" if not c else f"{c['speedup']:.2f}x"
        mem_t = "-" if t is None or t["peak_memory_mb"] is None else f"{t['peak_memory_mb']:.0f}"
        mem_s = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        t_ips = "-" if t is None else f"{t['images_per_s']:.2f}"
        lines.append(f"{key(r)[0]:>5} {r['resolution']:>5} {r['tokens']:>6} {r['model']:<14} {t_ips:>13} "
                     f"{r['images_per_s']:>13.2f} {speed:>8} {bound:>6} {frac:>8} {mem_t + '/' + mem_s:>15}")
    for skip in record.get("skipped", []):
        lines.append(f"skipped {skip['model']} at {skip['resolution']}px batch {skip['batch_size']}: {skip['reason']}")
    for name, cross in record.get("crossover", {}).items():
        where = f"≈{cross['resolution']:.0f}px" if cross.get("resolution") else cross.get("note", "")
        lines.append(f"crossover {name}: {where}")
    if "train_steps" in record:
        lines.append(format_train_table(record["train_steps"]))
    return "\n".join(lines)


def format_train_table(ts: dict) -> str:
    """One line per stage, resolution and student: step ms, speed-up, training FLOP bound, fraction, memory."""
    res = {(r["stage"], r["resolution"], r["model"]): r for r in ts["results"]}
    lines = [f"train steps, batch {ts['batch_size']}:",
             f"{'stage':<9} {'res':>5} {'student':<14} {'teacher ms':>10} {'student ms':>10} {'speed-up':>8} "
             f"{'bound':>6} {'of bound':>8} {'mem T/S MiB':>13}"]
    for c in ts["comparisons"]:
        t, s = res[(c["stage"], c["resolution"], "teacher")], res[(c["stage"], c["resolution"], c["student"])]
        bound = "-" if c["flop_bound"] is None else f"{c['flop_bound']:.2f}x"
        frac = "-" if c["fraction_of_bound"] is None else f"{100 * c['fraction_of_bound']:.0f}%"
        mem = ("-" if t["peak_memory_mb"] is None or s["peak_memory_mb"] is None
               else f"{t['peak_memory_mb']:.0f}/{s['peak_memory_mb']:.0f}")
        lines.append(f"{c['stage']:<9} {c['resolution']:>5} {c['student']:<14} {t['step_ms']:>10.0f} "
                     f"{s['step_ms']:>10.0f} {c['speedup']:>7.2f}x {bound:>6} {frac:>8} {mem:>13}")
    return "\n".join(lines)


def _stages(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _bench(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..benchmark import bench, plot_bench, write_json
    from ..errors import ConfigError

    if args.model and args.attention:
        raise ConfigError("--attention builds students from --teacher; it cannot be combined with --model")
    teacher_kwargs = parse_options(args.teacher_option)
    if args.model:
        # lazy: keeps adala --help fast (no training code at parse time)
        from ..models.io import read_config

        teacher = args.teacher or read_config(args.model[0]).get("teacher")
        if not teacher:
            raise ConfigError(f"{args.model[0]} records no teacher; pass --teacher")
        students = {}
        for path in args.model:
            name = path.rstrip("/").split("/")[-1] or path
            students[name if name not in students and name != "teacher" else path] = path
    else:
        teacher = args.teacher or "dinov2-s14"
        students = args.attention or ["linear-elu"]
    batch_sizes = _ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else [args.batch_size]
    record = bench(
        teacher, students, _ints(args.resolutions, "--resolutions"), batch_sizes, args.device, args.dtype,
        args.repeats, args.warmup, teacher_kwargs=teacher_kwargs, options=parse_options(args.option),
        keep_softmax=parse_keep(args.keep_softmax), memory=not args.no_memory, train_steps=args.train_steps,
        train_resolution=args.train_resolution, train_repeats=args.train_repeats,
        train_resolutions=_ints(args.train_resolutions, "--train-resolutions") if args.train_resolutions else None,
        train_batch_size=args.train_batch_size, train_memory=_stages(args.train_memory),
        train_memory_repeats=args.train_memory_repeats, threads=args.threads,
        max_load=args.max_load, max_wait=args.max_wait, compile_feature_maps=args.compile,
        min_seconds=args.min_seconds, sdpa=args.sdpa_backend, cuda_graphs=args.cuda_graphs,
        progress=None if args.quiet else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)),
        teacher_max_resolution=args.teacher_max_resolution,
    )
    write_json(record, args.out)
    print(format_table(record))
    print(f"wrote {args.out}")
    if args.plot:
        plot_bench(record, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed, memory and FLOPs: teacher (softmax) vs linear students")
    src = p.add_argument_group("models")
    src.add_argument("--teacher", default=None, help="teacher spec (default dinov2-s14, or the --model's teacher)")
    src.add_argument("--teacher-option", action="append", metavar="KEY=VALUE",
                     help="keyword for load_teacher, e.g. pretrained=false depth=2 (repeatable; default: none)")
    src.add_argument("--model", action="append", metavar="DIR",
                     help="a saved student to compare with its teacher (repeatable; default: none)")
    src.add_argument("--attention", nargs="+", action="extend", metavar="KIND",
                     help="attention kinds to build from the teacher (default linear-elu)")
    src.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="attention option (repeatable; default: the kind's defaults)")
    src.add_argument("--keep-softmax", default=None, metavar="I,J",
                     help="blocks that keep exact softmax (default: none)")
    p.add_argument("--resolutions", default="224,448,672,896,1344", help="comma-separated image sizes")
    p.add_argument("--batch-size", type=int, default=1, help="images per timed forward")
    p.add_argument("--batch-sizes", default=None, metavar="B,B",
                   help="several batch sizes, e.g. 1,8 (each resolution at each; default: --batch-size alone)")
    p.add_argument("--teacher-max-resolution", type=int, default=None, metavar="PX",
                   help="time only the students above this size (the softmax teacher is O(N²); default: no limit)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision of the timed forward")
    p.add_argument("--sdpa-backend", default=None, choices=["flash", "efficient", "cudnn", "math"],
                   help="pin the softmax teacher's torch SDPA backend (default: torch's choice)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time forwards replayed from CUDA graphs (no launch overhead; every model alike)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model (median reported)")
    p.add_argument("--min-seconds", type=float, default=0.0, metavar="S",
                   help="time each model at least S seconds per resolution (more rounds for quick forwards)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model and resolution")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--max-load", type=float, default=None, metavar="CORES",
                   help="before each resolution wait until other processes use fewer cores than this (default: no "
                        "wait)")
    p.add_argument("--max-wait", type=float, default=600.0, help="longest wait for --max-load, seconds")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the linear feature map (one pass; first call compiles for tens of s)")
    p.add_argument("--train-steps", action="store_true",
                   help="also time stage-1, stage-2 and fine-tune optimiser steps, teacher architecture vs students")
    p.add_argument("--train-resolution", type=int, default=None,
                   help="one resolution for --train-steps (default: the first --resolutions entry)")
    p.add_argument("--train-resolutions", default=None, metavar="R1,R2",
                   help="comma-separated resolutions for --train-steps (default: --train-resolution alone)")
    p.add_argument("--train-batch-size", type=int, default=2, help="images per optimiser step with --train-steps")
    p.add_argument("--train-memory", default=None, metavar="STAGES",
                   help="peak memory per step for these stages, e.g. stage2 (CPU: a fresh subprocess per case; "
                        "default: none)")
    p.add_argument("--train-memory-repeats", type=int, default=1, metavar="K",
                   help="fresh processes per --train-memory case (median reported)")
    p.add_argument("--train-repeats", type=int, default=3, help="timed optimiser steps per stage with --train-steps")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--plot", default=None, help="PNG output path (default: no plot)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_bench)
