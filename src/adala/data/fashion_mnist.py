"""Fashion-MNIST from local IDX files: Debian's ``dataset-fashion-mnist`` package keeps the project offline.

Lookup order: ``$ADALA_FASHION_MNIST_DIR``, ``/usr/share/datasets/fashion-mnist``, a previous download in
the adala cache, then (last resort) torchvision's downloader into that cache. Decoded arrays are cached per
process so building many datasets (train/eval, seg canvases) costs one decode.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import SeededDataset
from .transforms import ImageTransform, to_chw_uint8

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "valid": "test", "validation": "test"}
_NOT_FOUND = (
    "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
    "(apt-get install dataset-fashion-mnist) or set ADALA_FASHION_MNIST_DIR"
)
_ARRAYS: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use train or test") from None


def cache_dir() -> Path:
    return Path(os.environ.get("ADALA_CACHE") or Path.home() / ".cache" / "adala").expanduser()


def _download_root() -> Path:
    return cache_dir() / "fashion-mnist"


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_files(split: str) -> tuple[Path, Path] | None:
    dirs = [Path(d).expanduser() for d in (os.environ.get("ADALA_FASHION_MNIST_DIR"),) if d]
    dirs += [DEBIAN_DIR, _download_root() / "FashionMNIST" / "raw"]
    p = _PREFIX[split]
    for d in dirs:
        images = _idx_file(d, f"{p}-images-idx3-ubyte")
        labels = _idx_file(d, f"{p}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def _download(split: str) -> None:
    """torchvision's downloader (needs internet); raises on any failure."""
    # lazy: torchvision's dataset code loads only for this source
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(_download_root()), train=split == "train", download=True)


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, got {len(data) - offset} bytes")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels uint8 (N,)) for ``train`` or ``test``; cached per process."""
    split = canonical_split(split)
    files = _find_files(split)
    if files is None:
        try:
            _download(split)
        except Exception:
            raise DataError(_NOT_FOUND) from None
        files = _find_files(split)
        if files is None:
            raise DataError(_NOT_FOUND)
    key = (str(files[0]), split)
    if key not in _ARRAYS:
        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST files disagree: images {images.shape}, labels {labels.shape}")
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise DataError(f"Fashion-MNIST labels out of range in {files[1]}")
        _ARRAYS[key] = (images, labels)
    return _ARRAYS[key]


class FashionMNIST(SeededDataset):
    """Classification (or, with task='unlabeled', images only); 28x28 grey replicated to RGB, resized to S."""

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
    ) -> None:
        self.split = canonical_split(split)
        self.images, self.labels = load_arrays(self.split)
        transform = ImageTransform(img_size, mean, std, train=train, scale=(0.35, 1.0))
        n = len(self.labels)
        super().__init__(task=task, transform=transform, seed=seed, source_len=n, length=length)
        self._set_classes(CLASS_NAMES)

    def _load(self, src: int, i: int) -> tuple[torch.Tensor, int]:
        return to_chw_uint8(self.images[src]), int(self.labels[src])
