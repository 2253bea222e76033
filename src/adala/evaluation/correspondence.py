"""Dense correspondence on real photos: what DINOv2 patch features are used for, measured without labels.

Each source image gives two views with a known geometric relation: view A is the centre square of the
image, view B a ``zoom``× sub-square of A at a fixed offset, both resized to the evaluation size. For every
patch of B whose centre lies inside A, the nearest patch of A (cosine of the final patch tokens) is a
correct match when its centre lies within one patch of the true location. The teacher's accuracy is the
ceiling a student is compared with: a student that keeps mean token cosine but scrambles which patches
resemble each other loses here.

A one-patch tolerance also rewards *blur*: features smoother than the teacher's send more matches to a
neighbour of the true patch. So each model's adjacent-patch cosine (view A, right and lower neighbours) is
reported beside its accuracy: a student that beats the teacher's accuracy with neighbouring patches more
alike than the teacher's may be matching by blur.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import normalize
from ..models.families import family_of
from ..models.surgery import backbone_of

ZOOM = 0.7
# B's top-left corner inside A, as a fraction of A's side (more offsets = more pairs per image)
OFFSETS = ((0.15, 0.15),)


def views(img: torch.Tensor, size: int, zoom: float = ZOOM, offset: tuple[float, float] = OFFSETS[0]
          ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """uint8 (3,H,W) -> views A, B as float (3,size,size) in [0,255] and (ox, oy, zoom) of B in A's unit square."""
    h, w = img.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = img[:, top : top + s, left : left + s]
    side = round(zoom * s)
    oy, ox = round(offset[0] * s), round(offset[1] * s)
    oy, ox = min(oy, s - side), min(ox, s - side)
    b = a[:, oy : oy + side, ox : ox + side]

    def resize(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[None].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]

    return resize(a), resize(b), (ox / s, oy / s, side / s)


def match_accuracy(feat_a: torch.Tensor, feat_b: torch.Tensor, grid: int, geom: tuple[float, float, float]
                   ) -> tuple[int, int]:
    """(correct, total) nearest-neighbour matches of B's patches into A's, for (grid², C) patch features."""
    ox, oy, zoom = geom
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # patch centres in the unit square
    by, bx = torch.meshgrid(centres, centres, indexing="ij")
    ax, ay = ox + zoom * bx.flatten(), oy + zoom * by.flatten()  # where B's patch centres lie in A
    sim = F.normalize(feat_b.float(), dim=-1) @ F.normalize(feat_a.float(), dim=-1).T
    pred = sim.argmax(-1)
    px, py = centres[pred % grid], centres[pred // grid]
    tol = 1.0 / grid  # within one patch of the true location
    ok = ((px - ax).abs() <= tol) & ((py - ay).abs() <= tol)
    return int(ok.sum()), int(ok.numel())


def adjacent_cosine(feat: torch.Tensor, grid: int) -> float:
    """Mean cosine of each patch with its right and lower neighbours, for (grid², C) features: 1 for a constant
    map, about 0 for unrelated patches; how smooth the features are on the patch grid."""
    f = F.normalize(feat.float(), dim=-1).view(grid, grid, -1)
    right, down = (f[:, 1:] * f[:, :-1]).sum(-1), (f[1:] * f[:-1]).sum(-1)
    return float(torch.cat([right.flatten(), down.flatten()]).mean())


@torch.no_grad()
def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, h·w, C) features on the patch grid, row-major (the family's dense features: SAM's neck too)."""
    vit = backbone_of(model)
    return family_of(vit).dense_features(vit, x).flatten(2).transpose(1, 2)


def view_pair(img: torch.Tensor, img_size: int, mean: Sequence[float], std: Sequence[float],
              offset: tuple[float, float] = OFFSETS[0]) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Views A and B of a uint8 (3,H,W) image as one normalised (2,3,size,size) batch, and B's geometry in A."""
    a, b, geom = views(img, img_size, offset=offset)
    return normalize(torch.stack([a, b]).round().clamp(0, 255), mean, std), geom


@torch.no_grad()
def correspondence(models: dict[str, nn.Module], images: Sequence[torch.Tensor], img_size: int,
                   mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> dict:
    """Matching accuracy of each named model over ``images`` (uint8 (3,H,W)) at ``img_size``, and under
    ``"adjacent_cosine"`` each model's mean :func:`adjacent_cosine` of view A."""
    first = backbone_of(next(iter(models.values())))
    patch = family_of(first).patch_size(first)
    grid = img_size // patch
    counts = {name: [0, 0] for name in models}
    smooth = {name: 0.0 for name in models}
    for img in images:
        for offset in OFFSETS:
            x, geom = view_pair(img, img_size, mean, std, offset)
            for name, m in models.items():
                fa, fb = patch_tokens(m, x.to(device)).cpu()
                ok, n = match_accuracy(fa, fb, grid, geom)
                counts[name][0] += ok
                counts[name][1] += n
                smooth[name] += adjacent_cosine(fa, grid)
    pairs = len(images) * len(OFFSETS)
    return ({name: c[0] / max(c[1], 1) for name, c in counts.items()}
            | {"num_pairs": pairs, "adjacent_cosine": {name: v / max(pairs, 1) for name, v in smooth.items()}})

