"""Per-item seeded image transforms.

Every random draw goes through an explicit ``torch.Generator`` built from ``(seed, ..., index)``, never the
global RNG: an item is then a pure function of its index, so resumed runs and any number of DataLoader
workers see exactly the same pixels. Geometric ops are applied to image and mask with the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

# Salts keep the streams for different purposes (augmentation, content composition, subsets) independent.
SALT_AUG = 0xA06
SALT_CONTENT = 0xC0E
SALT_SUBSET = 0x5B5

_BILINEAR = InterpolationMode.BILINEAR
_NEAREST = InterpolationMode.NEAREST
_AA_BILINEAR = {"interpolation": _BILINEAR, "antialias": True}


def item_seed(*parts: int) -> int:
    """Mix integer parts into a 63-bit seed (SeedSequence hashing: nearby parts give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def item_generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(item_seed(*parts))
    return g


def item_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(item_seed(*parts))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g`` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: largest centred crop with a clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ImageTransform:
    """uint8 (3,H,W) image [+ (H,W) mask] -> normalised float (3,S,S) [+ long (S,S) mask].

    ``train``: random resized crop, horizontal flip and light colour jitter (image only).
    Eval: resize the shorter side to S and centre-crop, bilinear for images and nearest for masks.
    """

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool = True
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    # brightness, contrast, saturation, hue. Hue is off by default: its HSV round trip costs ~10x the rest.
    jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.0)

    def __call__(
        self, img: torch.Tensor, mask: torch.Tensor | None = None, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = [self.img_size, self.img_size]
        tiny = self.img_size == 1
        m = None if mask is None else mask[None]
        if self.train:
            if g is None:
                raise ValueError("train transforms need an explicit torch.Generator (per-item determinism)")
            height, width = img.shape[-2:]
            top, left, h, w = random_resized_crop_params(height, width, self.scale, self.ratio, g)
            img = _resample(F.resized_crop, img, top, left, h, w, size, one_pixel=tiny, **_AA_BILINEAR)
            if m is not None:
                m = F.resized_crop(m, top, left, h, w, size, interpolation=_NEAREST)
            if self.flip and float(torch.rand((), generator=g)) < 0.5:
                img = F.horizontal_flip(img)
                m = None if m is None else F.horizontal_flip(m)
            img = self._jitter(img, g)
        else:
            img = _resample(F.resize, img, self.img_size, one_pixel=tiny, **_AA_BILINEAR)
            img = F.center_crop(img, size)
            if m is not None:
                m = F.center_crop(F.resize(m, self.img_size, interpolation=_NEAREST), size)
        return normalize(img, self.mean, self.std), (None if m is None else m[0].long())

    def _jitter(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, s, h = self.jitter
        ops = [
            (F.adjust_brightness, b, 1.0),
            (F.adjust_contrast, c, 1.0),
            (F.adjust_saturation, s, 1.0),
            (F.adjust_hue, h, 0.0),
        ]
        for k in torch.randperm(4, generator=g).tolist():
            fn, amount, centre = ops[k]
            if amount > 0:
                factor = _uniform(g, centre - amount, centre + amount)
                img = fn(img, max(factor, 0.0) if centre else factor)
        return img


def _resample(op, img: torch.Tensor, *args, one_pixel: bool, **kwargs) -> torch.Tensor:
    """torch's uint8 antialiased bilinear kernel asserts on 1-pixel outputs: take the float path there."""
    if one_pixel and img.dtype == torch.uint8:
        return op(img.float(), *args, **kwargs).round_().clamp_(0, 255).to(torch.uint8)
    return op(img, *args, **kwargs)


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (3,H,W) -> float32, scaled to [0,1] then standardised per channel."""
    x = img.to(torch.float32).div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def to_chw_uint8(arr: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8 array -> contiguous (3,H,W) uint8 tensor (grey replicated to 3 channels)."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a copy: sources may be read-only buffers
    if t.ndim == 2:
        t = t[None].expand(3, -1, -1)
    else:
        t = t.permute(2, 0, 1)
    return t.contiguous()


class IndexedDataset(torch.utils.data.Dataset):
    """Items of ``base`` paired with their index, so a collate function can make per-batch choices that are
    a pure function of the data order (and so survive resume and any number of workers)."""

    def __init__(self, base: torch.utils.data.Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.base[i], int(i)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)


@dataclass(frozen=True)
class MultiSizeCollate:
    """Batches of (image, index) at the largest size -> one image batch at a size drawn per batch.

    Every image of a batch shares one size (a batch is one tensor); the size is drawn from the batch's
    smallest index, so the sequence of sizes is fixed by the seed and data order alone. Crops are made at the
    largest size and downsampled (antialiased), which is what a random resized crop at the smaller size does.

    ``mosaic`` > 0: each image is, with that probability, replaced by a 2×2 mosaic of itself and three other
    images of the batch at half size (YOLO's mosaic). Alignment needs no labels, so every mosaic is a new
    scene the teacher labels for free: new layouts and cross-image attention from the same few sources, the
    data-bound gap of a student aligned on a few dozen photos. Drawn per item from (seed, index), like crops.
    """

    sizes: tuple[int, ...]
    seed: int = 0
    mosaic: float = 0.0

    def size_for(self, indices: Sequence[int]) -> int:
        return self.sizes[item_seed(self.seed, min(indices), SALT_AUG) % len(self.sizes)]

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        x = torch.stack([im for im, _ in items])
        indices = [i for _, i in items]
        if self.mosaic > 0:
            x = mosaic_batch(x, indices, self.mosaic, self.seed)
        size = self.size_for(indices)
        if size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        return x


def mosaic_batch(x: torch.Tensor, indices: Sequence[int], p: float, seed: int = 0) -> torch.Tensor:
    """(B, C, S, S) -> the same batch with each image, with probability ``p`` (drawn from (seed, its index)),
    replaced by a 2×2 mosaic of four batch images at S/2: itself and three others in a drawn order
    (with fewer than four images some repeat). Images not drawn, and ``x`` itself, are left unchanged."""
    b, _, h, w = x.shape
    out = halves = None
    for j, idx in enumerate(indices):
        g = item_generator(seed, idx, SALT_CONTENT)
        if float(torch.rand((), generator=g)) >= p:
            continue
        others = [k for k in torch.randperm(b, generator=g).tolist() if k != j]
        tiles = [j, *(others * 3)[:3]] if others else [j] * 4
        order = torch.randperm(4, generator=g).tolist()
        if out is None:  # every image at half size once, shared by all the batch's mosaics
            out = x.clone()
            halves = torch.nn.functional.interpolate(x, size=(h // 2, w // 2), mode="bilinear", antialias=True,
                                                     align_corners=False)
        out[j] = 0
        for q in range(4):
            r, c = divmod(q, 2)
            out[j, :, r * (h // 2):(r + 1) * (h // 2), c * (w // 2):(c + 1) * (w // 2)] = halves[tiles[order[q]]]
    return x if out is None else out
