"""Where a student's CLS error comes from: per held-out photo, the CLS cosine after every block and the last
block's CLS attention, teacher vs student.

    python benchmarks/cls_attention.py --model runs/reference-highres/stage2 --size 1344

Prefix rows attend exactly in the ``agent`` kind, so a CLS error can only enter through the patch tokens the
CLS query reads. This prints, for each of the held-out photos (their centre view, as ``adala evaluate --task
features --length 10`` scores them): the final CLS cosine; the CLS cosine after each block; and, in the last
block, each head's CLS attention entropy (nats) and the share of its mass on the top 1 % of tokens, for the
teacher on its own block input and for the student on its own (with its own q/k weights), plus the total
variation distance between the two rows. A mean CLS cosine over 10 photos can be carried by one or two of
them: at 1344² the reference student's 0.943 is eight photos at 0.93-0.99 and two at 0.85, where the student's
last-block CLS row piles onto a few patches of a small object (grace_hopper) or spreads (EveningGlow).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from adala.cli.core import parse_options
from adala.data import build_dataset
from adala.data.photos import pool_sources
from adala.models import load_model, load_teacher
from adala.models.families import family_of


def block_outputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output tokens and the final (normed) tokens of one forward."""
    outs: list[torch.Tensor] = []
    blocks = family_of(model).blocks(model)
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in blocks]
    try:
        final = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def cls_row(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, N) softmax attention of the CLS query in ``block`` on block input ``x``, with the block's own
    q/k projections (teacher's timm attention and every adala kind share the attribute names)."""
    attn = block.attn
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return torch.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), dim=-1)[:, :, 0]


def row_stats(p: torch.Tensor) -> dict[str, list[float]]:
    top = max(1, p.shape[-1] // 100)
    return {"entropy": (-(p * p.clamp_min(1e-12).log()).sum(-1))[0].tolist(),
            "top1pct_mass": p.topk(top, dim=-1).values.sum(-1)[0].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="student model directory")
    ap.add_argument("--size", type=int, default=1344, help="image size (default 1344)")
    ap.add_argument("--length", type=int, default=10, help="held-out photos (default 10)")
    ap.add_argument("--teacher", default="dinov2-s14", help="teacher spec (default dinov2-s14)")
    ap.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="attention option changed on loading, e.g. agents=9 (as adala evaluate --option)")
    ap.add_argument("--out", default=None, help="JSON output path (default: none)")
    args = ap.parse_args()
    options = parse_options(args.option)
    teacher, student = load_teacher(args.teacher).eval(), load_model(args.model, options=options).eval()
    cfg = teacher.adala_config
    ds = build_dataset("heldout", task="unlabeled", img_size=args.size, mean=cfg["mean"], std=cfg["std"],
                       train=False, length=args.length)
    names = [name for name, _ in pool_sources("heldout", True)[: args.length]]  # the dataset's order, not decoded
    last_t, last_s = family_of(teacher).blocks(teacher)[-1], family_of(student).blocks(student)[-1]
    rows = []
    print(f"| photo ({args.size}²) | final CLS cosine | CLS cosine after blocks 1-12 | last-block CLS entropy, "
          "teacher / student (mean over heads) | top-1 % mass, teacher / student | TV distance |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for i in range(len(ds)):
            x = ds[i].unsqueeze(0)
            t_outs, t_final = block_outputs(teacher, x)
            s_outs, s_final = block_outputs(student, x)
            per_block = [F.cosine_similarity(t[:, 0], s[:, 0], dim=-1).item() for t, s in zip(t_outs, s_outs)]
            final = F.cosine_similarity(t_final[:, 0], s_final[:, 0], dim=-1).item()
            pt, ps = cls_row(last_t, t_outs[-2]), cls_row(last_s, s_outs[-2])
            row = {"photo": names[i], "final_cls_cosine": final, "cls_cosine_per_block": per_block,
                   "teacher": row_stats(pt), "student": row_stats(ps),
                   "tv_distance": (0.5 * (pt - ps).abs().sum(-1))[0].tolist()}
            rows.append(row)
            mean = lambda v: sum(v) / len(v)  # noqa: E731
            print(f"| {names[i]} | {final:.3f} | {' '.join(f'{c:.3f}' for c in per_block)} | "
                  f"{mean(row['teacher']['entropy']):.2f} / {mean(row['student']['entropy']):.2f} | "
                  f"{mean(row['teacher']['top1pct_mass']):.3f} / {mean(row['student']['top1pct_mass']):.3f} | "
                  f"{mean(row['tv_distance']):.3f} |")
    print(f"mean final CLS cosine: {sum(r['final_cls_cosine'] for r in rows) / len(rows):.4f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"size": args.size, "model": args.model, "options": options, "rows": rows}, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
