"""Semantic segmentation composed from Fashion-MNIST: a real, offline dense-prediction benchmark.

Canvas i places 2-4 items of the split on an 84x84 black canvas (3x3 grid cells with +-5 px jitter, later
items on top); ``fashion-mnist-seg-large`` places 16-32 items on a 224x224 canvas (8x8 cells), so that at the
448²-896² inputs linear attention is for, a canvas has many objects and a segmentation head many patches.
A pixel is labelled with its item's class + 1 where the item is brighter than a threshold,
otherwise background 0. The layout and the items are drawn from ``(seed, i)`` only.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import SeededDataset
from .fashion_mnist import CLASS_NAMES, canonical_split, load_arrays
from .transforms import SALT_CONTENT, ImageTransform, item_rng, to_chw_uint8

SEG_CLASS_NAMES = ["background", *CLASS_NAMES]
CANVAS = 84
_CELL = 28
_JITTER = 5
FOREGROUND_THRESHOLD = 25  # uint8 intensity; Fashion-MNIST backgrounds are ~0
DEFAULT_LENGTH = {"train": 2000, "test": 500}


def compose_canvas(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, grid: int = 3
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(28·grid)² uint8 image and label map from randomly placed items: 2-4 of them on the default 3x3 grid,
    a quarter to a half of the cells on larger grids."""
    side = grid * _CELL
    canvas = np.zeros((side, side), np.uint8)
    mask = np.zeros((side, side), np.uint8)
    lo, hi = (2, 5) if grid == 3 else (grid * grid // 4, grid * grid // 2 + 1)
    k = int(rng.integers(lo, hi))
    cells = rng.choice(grid * grid, size=k, replace=False)
    items = rng.integers(0, len(labels), size=k)
    for cell, idx in zip(cells.tolist(), items.tolist()):
        y0, x0 = divmod(cell, grid)
        dy, dx = rng.integers(-_JITTER, _JITTER + 1, size=2).tolist()
        y = int(np.clip(y0 * _CELL + dy, 0, side - _CELL))
        x = int(np.clip(x0 * _CELL + dx, 0, side - _CELL))
        item = images[idx]
        fg = item > FOREGROUND_THRESHOLD
        canvas[y : y + _CELL, x : x + _CELL][fg] = item[fg]
        mask[y : y + _CELL, x : x + _CELL][fg] = int(labels[idx]) + 1
    return canvas, mask


class FashionMNISTSeg(SeededDataset):
    """Items ``(image (3,S,S), mask long (S,S))``; 11 classes. Train split canvases use train items only."""

    def __init__(
        self,
        *,
        split: str,
        task: str,
        img_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        train: bool,
        seed: int = 0,
        length: int | None = None,
        grid: int = 3,
    ) -> None:
        self.grid = int(grid)
        self.split = canonical_split(split)
        self.images, self.labels = load_arrays(self.split)
        n = DEFAULT_LENGTH[self.split] if length is None else int(length)
        transform = ImageTransform(img_size, mean, std, train=train, scale=(0.35, 1.0))
        super().__init__(task=task, transform=transform, seed=seed, source_len=n, length=n)
        self._set_classes(SEG_CLASS_NAMES)

    def canvas(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw image and label map of canvas ``i`` (before resizing/augmentation)."""
        return compose_canvas(self.images, self.labels, item_rng(self.seed, i, SALT_CONTENT), self.grid)

    def _load(self, src: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.canvas(src)
        return to_chw_uint8(img), torch.from_numpy(mask)
