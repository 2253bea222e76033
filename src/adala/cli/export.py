"""``adala export``: a saved model (or any teacher spec) to a verified ONNX graph of ``forward_features``."""

from __future__ import annotations

import argparse

FORMATS = ("onnx",)


def _export(args: argparse.Namespace) -> int:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..errors import ConfigError
    from ..models import load_teacher
    from ..models.export import export_onnx
    from .core import parse_ints

    if args.atol <= 0:
        raise ConfigError(f"--atol must be positive (got {args.atol})")
    checks = parse_ints(args.check_sizes, "--check-sizes") if args.check_sizes else None
    model = load_teacher(args.model, allow_pickle=False)  # adala directories, timm saves, teacher specs
    report = export_onnx(model, args.out, opset=args.opset, dynamic=args.dynamic, img_size=args.img_size,
                         check_sizes=checks, atol=args.atol)
    print(report.summary())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..models.export import DEFAULT_ATOL

    p = sub.add_parser("export", help="export forward_features to ONNX, verified against PyTorch in onnxruntime")
    p.add_argument("--model", required=True, metavar="DIR|SPEC",
                   help="model directory written by adala (linearize or a stage), or any --teacher spec "
                        "(e.g. dinov2-s14)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format (only onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--dynamic", action="store_true",
                   help="dynamic height/width: one graph for every multiple of the patch size (default: fixed "
                        "size; batch is always dynamic)")
    p.add_argument("--img-size", type=int, default=None,
                   help="size traced, and the only size a fixed graph accepts (default: the model's native size)")
    p.add_argument("--check-sizes", default=None, metavar="N,N",
                   help="sizes compared with PyTorch in onnxruntime (default: --img-size, plus half of it "
                        "with --dynamic)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"largest allowed |onnxruntime - torch| at any checked size (default {DEFAULT_ATOL:g})")
    p.add_argument("--out", required=True, metavar="FILE", help="output .onnx file")
    p.set_defaults(func=_export)
