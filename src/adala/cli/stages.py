"""``adala align-attention``, ``align-features``, ``finetune``, ``evaluate`` and ``run`` (YAML recipes)."""

from __future__ import annotations

import argparse
from pathlib import Path

# the choices of each flag, declared once beside the code that checks them (the recipes' schema reads them too)
from ..evaluation import TASKS as EVAL_TASKS
from ..stages.align_attention import TRAINABLE
from ..stages.align_features import LOSSES
from ..stages.finetune import TASKS as FINETUNE_TASKS
from ..train.loop import AMP_MODES, DEVICES
from .core import parse_options


def _train_kwargs(args: argparse.Namespace) -> dict:
    """The TrainConfig options given on the command line (unset ones keep the engine's defaults)."""
    out = {"seed": args.seed, "resume": args.resume, "progress": not args.quiet}
    for name in ("warmup_steps", "weight_decay", "accum_steps", "amp", "device", "ckpt_every", "num_workers",
                 "log_every", "grad_clip", "keep", "ema", "added_lr_scale"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, help="random seed for data order and init")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=None,
                   help="linear warm-up steps before the cosine decay (default 0)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=None,
                   help="AdamW weight decay (default 0.05)")
    g.add_argument("--grad-clip", dest="grad_clip", type=float, default=None,
                   help="clip the gradient norm to this value (default 1.0)")
    g.add_argument("--accum-steps", dest="accum_steps", type=int, default=None,
                   help="micro-batches accumulated per optimiser step (default 1)")
    g.add_argument("--amp", choices=list(AMP_MODES), default=None,
                   help="mixed precision (default auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", choices=DEVICES, default=None,
                   help="where to train (default auto: CUDA when available)")
    g.add_argument("--ckpt-every", dest="ckpt_every", type=int, default=None,
                   help="checkpoint every N steps (default 0: only at the end)")
    g.add_argument("--keep", type=int, default=None, help="checkpoints kept (default 2)")
    g.add_argument("--ema", type=float, default=None,
                   help="average the trained weights with this EMA decay, e.g. 0.99; the result and every "
                        "checkpoint's student are the average (default 0: off)")
    g.add_argument("--added-lr-scale", dest="added_lr_scale", type=float, default=None,
                   help="multiply the learning rate of the parameters the linearization added (dwc conv, "
                        "temperatures, output gate), which start at identity (default 1)")
    g.add_argument("--num-workers", dest="num_workers", type=int, default=None,
                   help="data-loader worker processes (default 0: load in the main process)")
    g.add_argument("--log-every", dest="log_every", type=int, default=None,
                   help="log the loss every N steps (default 10)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a finished run: nothing to do)")
    g.add_argument("--force", action="store_true",
                   help="write into an existing non-empty --out that adala did not create")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _data(specs: list[str] | None) -> str | list[str]:
    if not specs:
        return "photos"
    return specs[0] if len(specs) == 1 else specs


def _check_out(path: str, resume: bool) -> None:
    """Refuse to train over a finished stage unless resuming: nothing gets overwritten by mistake."""
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError

    p = Path(path)
    if not resume and (p / "adala.json").is_file() and (p / "metrics.json").is_file():
        raise ConfigError(f"{p} already holds a finished stage; choose another --out")


def _print_metrics(result, keys: tuple[str, ...] = ()) -> None:
    if result.already_finished:
        print(f"{result.out_dir} already finished ({result.metrics.get('steps', '?')} steps); "
              "--resume had nothing to do and nothing was written")
        return
    m = result.metrics
    shown = {k: m[k] for k in keys if k in m}
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    print(f"wrote {result.out_dir} ({result.metrics.get('steps', '?')} steps, "
          f"{result.metrics.get('wall_time_s', 0):.1f}s) " + " ".join(parts))


def _align_attention(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..stages import align_attention

    _check_out(args.out, args.resume)
    r = align_attention(args.teacher, args.student, attention=args.attention, data=_data(args.data),
                        img_size=args.img_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        trainable=args.trainable, train_options=parse_options(args.train_option) or None,
                        out=args.out, force=args.force, **_train_kwargs(args))
    blocks = sorted((k for k in r.metrics if k.startswith("loss/block_")), key=lambda k: int(k.split("_")[-1]))
    _print_metrics(r, ("loss",))
    if blocks:
        print("per-block loss: " + " ".join(f"{r.metrics[k]:.3g}" for k in blocks))
    return 0


def _align_features(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..stages import align_features

    _check_out(args.out, args.resume)
    r = align_features(args.teacher, args.student, data=_data(args.data), img_size=args.img_size, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, loss=args.loss, trainable=args.trainable,
                       mosaic=args.mosaic, cls_weight=args.cls_weight,
                       train_options=parse_options(args.train_option) or None, out=args.out, force=args.force,
                       **_train_kwargs(args))
    _print_metrics(r, ("loss", "mse", "cosine"))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..stages import finetune

    _check_out(args.out, args.resume)
    freeze = {"yes": True, "no": False, None: None}[args.freeze_backbone]
    r = finetune(args.model, task=args.task, data=args.data, img_size=args.img_size, epochs=args.epochs,
                 steps=args.steps, batch_size=args.batch_size, lr=args.lr, head=args.head, freeze_backbone=freeze,
                 length=args.length, eval_data=args.eval_data, eval_length=args.eval_length, out=args.out,
                 force=args.force, **_train_kwargs(args))
    _print_metrics(r, ("train/loss", "top1", "miou"))
    return 0


def _sizes(text: str) -> int | list[int]:
    """``224`` -> 224, ``224,448`` -> [224, 448] (argparse turns the ValueError into a one-line usage error)."""
    parts = [int(p) for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(text)
    return parts[0] if len(parts) == 1 and "," not in text else parts


def _table(result: dict) -> None:
    if "by_size" in result:
        for size, res in result["by_size"].items():
            print(f"--- {size}x{size}")
            _table(res)
        return
    if result.get("task") == "correspondence":
        for k in ("teacher_accuracy", "accuracy", "ratio_to_teacher", "teacher_adjacent_cosine", "adjacent_cosine"):
            print(f"{k:<23}  {result[k]:.4f}")
        return
    rows = [(k, result[k]) for k in ("top1", "mean_class_accuracy", "miou", "pixel_accuracy") if k in result]
    per = result.get("per_class_accuracy") or result.get("per_class_iou") or {}
    fid = result.get("fidelity")
    if fid:
        rows += [(k, fid[k]) for k in ("final_cosine", "cls_cosine", "final_rel_err", "structure_k10",
                                       "attn_rel_err_mean") if k in fid]
    width = max([len(k) for k, _ in rows] + [len(k) for k in per] + [8])
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4f}")
    if per:
        label = "per-class accuracy" if "per_class_accuracy" in result else "per-class IoU"
        print(f"{label}:")
        for k, v in per.items():
            print(f"  {k:<{width}}  {'-' if v is None else f'{v:.4f}'}")
    if fid:
        print("attention rel. error per block: " + " ".join(f"{v:.3f}" for v in fid["attn_rel_err"]))


def _evaluate(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..evaluation import evaluate

    result = evaluate(args.model, task=args.task, data=args.data, img_size=args.img_size, teacher=args.teacher,
                      batch_size=args.batch_size, length=args.length, out=args.out, device=args.device or "auto",
                      options=parse_options(args.option))
    _table(result)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..recipes import check_inputs, headline, load_recipe, run_recipe

    recipe = load_recipe(args.config, args.set)
    if args.check:
        for line in check_inputs(recipe):
            print(line)
        print(f"{args.config}: valid ({len(recipe.stages)} stages: "
              + ", ".join(f"{s.name}={s.kind}" for s in recipe.stages) + ")")
        return 0
    summary = run_recipe(recipe, args.out, fresh=args.fresh, force=args.force)
    print(f"\n{'stage':<14} {'kind':<16} {'status':<8} {'time':>8}  metrics")
    for s in summary["stages"]:
        print(f"{s['name']:<14} {s['kind']:<16} {s['status']:<8} {s['wall_time_s']:>7.1f}s  {headline(s['metrics'])}")
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def _add_train_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-option", dest="train_option", action="append", metavar="KEY=VALUE",
                   help="a weight-free attention option in force while training only, e.g. agents=4; the student "
                        "is saved with its own (repeatable; default: none)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align-attention", help="stage 1: align each linear attention with its softmax teacher")
    p.add_argument("--teacher", default="dinov2-s14", help="teacher spec (see 'adala teachers')")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--attention", default="linear-elu", help="linearize the teacher with this kind")
    src.add_argument("--student", default=None,
                     help="a linearized model directory instead (default: linearize the teacher)")
    p.add_argument("--data", action="append", default=None,
                   help="unlabeled image data spec (repeat to mix sources in equal parts; default photos)")
    p.add_argument("--img-size", dest="img_size", type=int, default=224,
                   help="image size, a multiple of the patch size")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--trainable", "--train", dest="trainable", choices=TRAINABLE, default="attention",
                   help="what stage 1 trains: q/k/v (+ the kind's own parameters), plus proj, or also norm1")
    _add_train_option(p)
    p.add_argument("--out", required=True, help="output directory")
    _add_train_args(p)
    p.set_defaults(func=_align_attention)

    p = sub.add_parser("align-features", help="stage 2: align the student's final tokens with the teacher's")
    p.add_argument("--teacher", default="dinov2-s14", help="teacher spec (see 'adala teachers')")
    p.add_argument("--student", required=True, help="model directory (stage-1 output or linearized)")
    p.add_argument("--data", action="append", default=None,
                   help="unlabeled image data spec (repeat to mix sources in equal parts; default photos)")
    p.add_argument("--img-size", dest="img_size", type=_sizes, default=224,
                   help="training resolution, or several (224,448): each batch at one of them")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--loss", choices=LOSSES, default="mse",
                   help="feature loss on the final tokens")
    p.add_argument("--trainable", "--train", dest="trainable", choices=TRAINABLE, default="all",
                   help="what stage 2 trains")
    p.add_argument("--mosaic", type=float, default=0.0,
                   help="fraction of images replaced by 2x2 mosaics of four batch images (default: 0, none)")
    p.add_argument("--cls-weight", type=float, default=0.0,
                   help="weight of the same loss on the CLS/register tokens alone (1: as much as all patches; "
                        "default: 0, none)")
    _add_train_option(p)
    p.add_argument("--out", required=True, help="output directory")
    _add_train_args(p)
    p.set_defaults(func=_align_features)

    p = sub.add_parser("finetune", help="stage 3: classification / linear probe / segmentation head")
    p.add_argument("--model", required=True, help="model directory or teacher spec")
    p.add_argument("--task", choices=FINETUNE_TASKS, default="classification",
                   help="head to train")
    p.add_argument("--data", required=True, help="labelled data spec (fashion-mnist, folder:PATH, ...)")
    p.add_argument("--img-size", dest="img_size", type=int, default=224,
                   help="image size, a multiple of the patch size")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the data (default: the task's, unless --steps is given)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps instead of --epochs (default: none)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="images per step (default: the task's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the task's)")
    p.add_argument("--head", default="linear",
                   help="classification: linear|mlp; segmentation: linear|linear4 (default linear)")
    p.add_argument("--freeze-backbone", dest="freeze_backbone", choices=["yes", "no"], default=None,
                   help="train only the head (default: yes for linear-probe, no otherwise)")
    p.add_argument("--length", type=int, default=None, help="use the first N training items (default: all)")
    p.add_argument("--eval-data", dest="eval_data", default=None,
                   help="score the result on this data (default: no scoring)")
    p.add_argument("--eval-length", dest="eval_length", type=int, default=None,
                   help="score the first N --eval-data items (default: all)")
    p.add_argument("--out", required=True, help="output directory")
    _add_train_args(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("evaluate", help="top-1 / mIoU, and fidelity to a teacher")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--task", choices=EVAL_TASKS, required=True,
                   help="what to score (features: fidelity to --teacher; correspondence: patch matching vs --teacher)")
    p.add_argument("--data", required=True, help="data spec to score on (fashion-mnist:test, folder:PATH, ...)")
    p.add_argument("--img-size", dest="img_size", type=_sizes, default=224,
                   help="resolution, or several (224,448,896): each scored on the same images")
    p.add_argument("--teacher", default=None, help="also measure fidelity to this teacher (default: none)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="images per forward")
    p.add_argument("--length", type=int, default=None, help="score the first N items (default: all)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="where to run (default auto: CUDA when available)")
    p.add_argument("--out", default=None, help="write the scores to this JSON file (default: print only)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="change an attention option that carries no weights when loading --model, e.g. agents=9 "
                        "(repeatable; default: as saved)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("run", help="run the stages of a YAML recipe (a file, or a packaged name: 'adala recipes')")
    p.add_argument("config", metavar="RECIPE", help="recipe YAML file, or a packaged recipe name such as demo")
    p.add_argument("--out", required=False, default=None,
                   help="output directory (one sub-directory per stage; required unless --check; default: none)")
    p.add_argument("--fresh", action="store_true", help="re-run every stage, ignoring finished ones")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. stages.stage1.steps=2 (repeatable; default: none)")
    p.add_argument("--check", action="store_true", help="only validate the recipe and its inputs; train nothing")
    p.add_argument("--force", action="store_true",
                   help="write into an existing non-empty --out that adala did not create")
    p.set_defaults(func=_run_checked)


def _run_checked(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError

    if not args.check and not args.out:
        raise ConfigError("run needs --out DIR (or --check to only validate)")
    return _run(args)


