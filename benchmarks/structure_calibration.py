"""What token cosine the structure and correspondence targets need: the teacher's features plus isotropic noise.

    python benchmarks/structure_calibration.py --size 448 --sigmas 0.1,0.15,0.2,0.25,0.3,0.4

For each held-out photo the teacher's final patch tokens get Gaussian noise of relative size σ per token
(σ·‖f‖/√C per channel, seeded), and the noisy features are scored against the clean ones with the same
metrics ``adala evaluate --task features`` reports (mean token cosine, k = 10 patch-structure agreement).
A student's errors are not isotropic noise, but the table says how much a structure target asks: on the 10
held-out photos at 448², noise that leaves token cosine 0.995 already drops the agreement to 0.79, and at
cosine 0.958 it is 0.44 (docs/figures/structure_calibration_448.json). Within one photo many patches are
near-ties, so k-NN overlap is far stricter than a cosine target of the same value.

The same noise on the teacher's tokens of both correspondence views (``adala evaluate --task correspondence``:
view B a 0.7x zoom of view A, nearest patch within one patch of the truth) gives the accuracy a student at that
cosine would keep if its errors were isotropic, as a fraction of the teacher's clean accuracy.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from adala.data import build_dataset
from adala.evaluation.correspondence import match_accuracy, patch_tokens, view_pair
from adala.evaluation.fidelity import STRUCTURE_K, structure_agreement
from adala.evaluation.run import source_images
from adala.models import load_teacher
from adala.models.families import family_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=448, help="image size (default 448)")
    ap.add_argument("--sigmas", default="0.1,0.15,0.2,0.25,0.3,0.4", help="relative noise sizes")
    ap.add_argument("--length", type=int, default=10, help="held-out images (default 10)")
    ap.add_argument("--teacher", default="dinov2-s14", help="teacher spec (default dinov2-s14)")
    ap.add_argument("--out", default=None, help="JSON output path (default: none)")
    args = ap.parse_args()
    teacher = load_teacher(args.teacher).eval()
    cfg = teacher.adala_config
    ds = build_dataset("heldout", task="unlabeled", img_size=args.size, mean=cfg["mean"], std=cfg["std"],
                       train=False, length=args.length)
    prefix = teacher.num_prefix_tokens
    with torch.no_grad():
        feats = [teacher.forward_features(ds[i].unsqueeze(0))[0, prefix:] for i in range(len(ds))]
    grid = args.size // family_of(teacher).patch_size(teacher)
    pairs = []  # (A tokens, B tokens, geometry) of each held-out source, as the correspondence task builds them
    with torch.no_grad():
        for img in source_images("heldout", args.length)[1]:
            x, geom = view_pair(img, args.size, cfg["mean"], cfg["std"])
            fa, fb = patch_tokens(teacher, x)
            pairs.append((fa, fb, geom))
    clean = sum(match_accuracy(fa, fb, grid, geom)[0] for fa, fb, geom in pairs)
    g = torch.Generator().manual_seed(0)

    def noisy(f: torch.Tensor, sigma: float) -> torch.Tensor:
        return f + sigma * torch.randn(f.shape, generator=g) * f.norm(dim=-1, keepdim=True) / f.shape[1] ** 0.5

    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        cos, struct = [], []
        for f in feats:
            n = noisy(f, sigma)
            cos.append(F.cosine_similarity(n, f, dim=-1).mean().item())
            struct.append(structure_agreement(n, f, STRUCTURE_K))
        hits = sum(match_accuracy(noisy(fa, sigma), noisy(fb, sigma), grid, geom)[0] for fa, fb, geom in pairs)
        rows.append({"sigma": sigma, "token_cosine": sum(cos) / len(cos), "structure": sum(struct) / len(struct),
                     "correspondence_ratio": hits / max(clean, 1)})
    print(f"\n| noise σ | token cosine | structure k={STRUCTURE_K} | correspondence, of the teacher's "
          f"({args.size}², {len(feats)} held-out photos) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['sigma']:.2f} | {r['token_cosine']:.3f} | {r['structure']:.3f} | "
              f"{r['correspondence_ratio']:.3f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"size": args.size, "teacher_correspondence_hits": clean, "rows": rows}, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
