"""scikit-learn's handwritten digits (1797 images, 8×8, 17 grey levels): a second offline probe set.

A different domain from Fashion-MNIST (strokes, not garments) that no recipe is tuned on, so a frozen linear
probe on it asks whether a student kept the teacher's general features rather than what stage 2 saw.
Read from the CSV inside the installed package (never a download). The split is fixed: the first 1200 images
(in the file's order) are ``train``, the remaining 597 ``test``.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import SeededDataset
from .transforms import ImageTransform, to_chw_uint8

CLASS_NAMES = [str(i) for i in range(10)]
TRAIN_COUNT = 1200


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) scaled 0..16 -> 0..255, labels (1797,))."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None else Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    if path is None or not path.is_file():
        raise DataError("sklearn digits not found: pip install scikit-learn")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    images = np.clip(np.rint(data[:, :64] * (255 / 16)), 0, 255).astype(np.uint8).reshape(-1, 8, 8)
    return images, data[:, 64].astype(np.int64)


class Digits(SeededDataset):
    """Classification (or unlabeled) digits, grey replicated to RGB and resized to S (bilinear, antialiased)."""

    def __init__(self, *, split: str, task: str, img_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float], train: bool, seed: int = 0, length: int | None = None) -> None:
        if split not in ("train", "test"):
            raise DataError(f"unknown digits split {split!r}; use train or test")
        images, labels = load_digits()
        part = slice(0, TRAIN_COUNT) if split == "train" else slice(TRAIN_COUNT, None)
        self.images, self.labels = images[part], labels[part]
        transform = ImageTransform(img_size, mean, std, train=train, scale=(0.6, 1.0))
        super().__init__(task=task, transform=transform, seed=seed, source_len=len(self.labels), length=length)
        self._set_classes(CLASS_NAMES)

    def _load(self, src: int, i: int) -> tuple[torch.Tensor, int]:
        return to_chw_uint8(self.images[src]), int(self.labels[src])
