"""Held-out fidelity against training budget: every checkpoint a stage kept, evaluated at several sizes.

    python benchmarks/fidelity_budget.py --run runs/reference-highres --stage stage2 --sizes 224,448,896

The stage must have been run with ``ckpt_every`` and a large enough ``keep`` (the reference recipe keeps every
checkpoint). Each checkpoint's student is rebuilt from the stage's own ``adala.json`` and scored with
``adala.evaluate(task="features", data="heldout")``; prints a Markdown table and writes JSON. This prices a
fidelity gap in steps: the cosine schedule makes step k of a long run a little worse than a run of k steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from adala.evaluation import evaluate
from adala.models import load_model, load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="recipe output directory")
    ap.add_argument("--stage", default="stage2", help="stage whose checkpoints to score (default stage2)")
    ap.add_argument("--sizes", default="224,448,896", help="evaluation sizes (default 224,448,896)")
    ap.add_argument("--length", type=int, default=10, help="held-out images per size (default 10)")
    ap.add_argument("--teacher", default="dinov2-s14", help="teacher spec (default dinov2-s14)")
    ap.add_argument("--out", default=None, help="JSON output (default RUN/STAGE/fidelity_budget.json)")
    args = ap.parse_args()
    stage = Path(args.run) / args.stage
    sizes = [int(s) for s in args.sizes.split(",")]
    teacher = load_teacher(args.teacher)
    model = load_model(stage)
    rows = []
    for ckpt in sorted(p for p in (stage / "checkpoints").glob("step-*") if p.is_dir()):
        model.load_state_dict(load_file(ckpt / "student.safetensors"))
        r = evaluate(model, task="features", data="heldout", img_size=sizes, teacher=teacher, length=args.length)
        row = {"step": int(ckpt.name.split("-")[1]),
               **{s: {k: r["by_size"][str(s)]["fidelity"][k] for k in ("final_cosine", "cls_cosine",
                                                                     "structure_k10")} for s in sizes}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| step | " + " | ".join(f"{s}² cos / CLS / struct" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for row in rows:
        cells = [" / ".join(f"{row[s][k]:.3f}" for k in ("final_cosine", "cls_cosine", "structure_k10"))
                 for s in sizes]
        print(f"| {row['step']} | " + " | ".join(cells) + " |")
    out = Path(args.out) if args.out else stage / "fidelity_budget.json"
    out.write_text(json.dumps({"run": str(args.run), "stage": args.stage, "sizes": sizes, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
