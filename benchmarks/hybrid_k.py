"""What keeping exact softmax in the K worst blocks buys: probe accuracy and speed for K = 0, 1, 2, 4.

Starts from a finished run of a recipe (default: the demo's, ``runs/demo``). With ``--after stage1``
(default, the method's order) the stage-1 student is ranked by per-block attention error on held-out
photos, its K worst blocks switch back to softmax (with their own q/k/v/proj), and the hybrid goes through
the recipe's stage 2; with ``--after stage2`` the K blocks are switched inside the finished stage-2
student, without retraining. Each hybrid gets the recipe's own linear probe (same data, epochs, seed), and
all are benched against the teacher in one interleaved run.

  python benchmarks/hybrid_k.py --run runs/demo --out runs/hybrid-k [--ks 0,1,2,4] [--after stage1|stage2]

Writes ``hybrid_k.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import adala
from adala.benchmark import bench
from adala.hybrid import block_errors, candidate_blocks, choose_softmax_blocks, make_hybrid
from adala.recipes import load_recipe
from adala.stages import align_features, finetune


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="output directory of a finished recipe run")
    ap.add_argument("--recipe", default="demo", help="the recipe that run used")
    ap.add_argument("--after", choices=("stage1", "stage2"), default="stage1",
                    help="hybridise the stage-1 student and run stage 2, or swap inside the stage-2 student")
    ap.add_argument("--stage1", default="stage1", help="the recipe's stage-1 stage name")
    ap.add_argument("--stage2", default="stage2", help="the recipe's stage-2 stage name")
    ap.add_argument("--probe", default="probe", help="linear-probe stage of the recipe whose settings are reused")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ks", default="0,1,2,4")
    ap.add_argument("--resolutions", default="224,896")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    run, out = Path(args.run), Path(args.out)
    recipe = load_recipe(args.recipe)
    stages = {s.name: s for s in recipe.stages}
    for name in (args.probe, args.stage2):
        if name not in stages:
            sys.exit(f"error: recipe {args.recipe} has no stage {name!r}")
    probe, stage2 = stages[args.probe], stages[args.stage2]
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    teacher = adala.load_teacher(recipe.teacher)
    student = adala.load_model(run / (args.stage1 if args.after == "stage1" else args.stage2))
    errors = block_errors(student, teacher, img_size=recipe.img_size)
    rows, models = [], {}
    for k in (int(x) for x in args.ks.split(",")):
        blocks = choose_softmax_blocks(errors, k, candidate_blocks(student))
        hybrid = make_hybrid(student, blocks)
        if args.after == "stage1":
            hybrid = align_features(teacher, hybrid, out=out / f"k{k}-stage2", **stage2.options).model
        metrics = finetune(hybrid, out=out / f"k{k}", **probe.options).metrics
        models[f"K={k}"] = hybrid
        rows.append({"k": k, "softmax_blocks": blocks, "probe_top1": metrics.get("top1")})
        print(f"K={k} softmax blocks {blocks}: probe top-1 {metrics.get('top1')}", flush=True)
    record = bench(teacher, models, resolutions=[int(r) for r in args.resolutions.split(",")],
                   repeats=args.repeats, memory=False, progress=print)
    for row in rows:
        for c in record["comparisons"]:
            if c["student"] == f"K={row['k']}":
                row[f"speedup@{c['resolution']}"] = c["speedup"]
    teacher_probe = json.loads((run / "probe_teacher" / "metrics.json").read_text()).get("top1") \
        if (run / "probe_teacher" / "metrics.json").is_file() else None
    result = {"run": str(run), "after": args.after, "block_errors": errors, "teacher_probe_top1": teacher_probe,
              "rows": rows, "bench": record}
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_k.json").write_text(json.dumps(result, indent=2))
    res = [int(r) for r in args.resolutions.split(",")]
    print(f"\nteacher probe top-1: {teacher_probe}")
    print("| K | softmax blocks | probe top-1 | " + " | ".join(f"speed-up @{r}²" for r in res) + " |")
    print("|---|---|---|" + "---|" * len(res))
    for row in rows:
        sp = " | ".join(f"{row.get(f'speedup@{r}', float('nan')):.2f}×" for r in res)
        print(f"| {row['k']} | {row['softmax_blocks']} | {row['probe_top1']:.3f} | {sp} |")
    print(f"wrote {out / 'hybrid_k.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
