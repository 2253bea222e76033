"""SAM relative position bias in linearized blocks: drop it, or keep its key-side part (``rel_pos="approx"``)?

Measures stage 1's per-block relative attention error (‖student − teacher‖ / ‖teacher‖ on the teacher's own
block inputs, 4 held-out photos) for both choices, before training and after ``--steps`` stage-1 steps
(same data, seed and lr for both). timm initialises ``rel_pos_h``/``rel_pos_w`` to zeros (then both choices
are identical), so the tables are drawn N(0, σ²) for each ``--sigma``: a sweep, since the pretrained tables
cannot be read without the hub.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sam_rel_pos.py --img-size 256 --steps 20
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sam_rel_pos.py --real --img-size 512 --steps 5
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import adala
from adala.data import build_dataset
from adala.stages import align_attention
from adala.stages.align_attention import AttentionAlignment


def teacher(real: bool, img_size: int, sigma: float) -> torch.nn.Module:
    kw = {"img_size": img_size}
    if not real:  # tiny: 2 heads of 32, windowed block 0 (4×4 windows), global block 1
        kw |= {"depth": 2, "embed_dim": 64, "num_heads": 2, "window_size": 4, "global_attn_indexes": [1]}
    torch.manual_seed(0)
    model = adala.load_teacher("timm:samvit_base_patch16", pretrained=False, **kw)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.rel_pos_h.normal_(0, sigma)
            blk.attn.rel_pos_w.normal_(0, sigma)
    return model


def errors(t: torch.nn.Module, s: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    obj = AttentionAlignment(t, s)
    with torch.no_grad():
        _, metrics = obj(x)
    obj.recorder.remove()
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("rel_err")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="real-sized samvit_base_patch16 (random init)")
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.1, 0.5])
    args = ap.parse_args()
    ds = build_dataset("photos:heldout", task="unlabeled", img_size=args.img_size, mean=(0.5,) * 3, std=(0.5,) * 3,
                       train=False, length=4)
    x = torch.stack([ds[i] for i in range(4)])
    rows = []
    for sigma in args.sigma:
        t = teacher(args.real, args.img_size, sigma)
        for rel_pos in ("drop", "approx"):
            s = adala.linearize(t, "linear-elu", rel_pos=rel_pos)
            row = {"sigma": sigma, "rel_pos": rel_pos, "init": errors(t, s, x)}
            if args.steps:
                torch.manual_seed(0)
                res = align_attention(t, s, data="photos", img_size=args.img_size, steps=args.steps, batch_size=2,
                                      lr=args.lr, out=tempfile.mkdtemp(), progress=False)
                row[f"after_{args.steps}_steps"] = errors(t, res.model, x)
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
