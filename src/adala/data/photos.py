"""Real photographs that ship inside installed packages (scikit-image, scikit-learn, matplotlib).

They give an offline, download-free stream of natural images: enough to distil attention behaviour on
real statistics. Files are read straight from the package directories (found with ``find_spec``, without
importing the packages), so no loader can ever trigger a download.
"""

from __future__ import annotations

import importlib.util
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .base import SeededDataset
from .images import ImageReadError, load_rgb
from .transforms import ImageTransform, to_chw_uint8

# name -> (package, path inside the package). Only real photographs (no charts, logos or synthetic images);
# all of these are bundled in the wheels, unlike skimage's pooch-fetched extras (eagle, lily, kidney, ...).
_PHOTO_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),  # stereo_motorcycle()[0]
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "brick": ("skimage", "data/brick.png"),
    "page": ("skimage", "data/page.png"),
    "text": ("skimage", "data/text.png"),
    "clock": ("skimage", "data/clock_motion.png"),
    "cell": ("skimage", "data/cell.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
_MAX_SHORT_SIDE = 512  # cached copies are downscaled: memory and per-crop cost stay small
HELDOUT_VIEWS = 4


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _photo_path(name: str) -> Path | None:
    package, rel = _PHOTO_FILES[name]
    root = _package_dir(package)
    path = None if root is None else root / rel
    return path if path is not None and path.is_file() else None


@lru_cache(maxsize=1)
def _available() -> tuple[str, ...]:
    return tuple(n for n in _PHOTO_FILES if _photo_path(n) is not None)


def photo_names() -> list[str]:
    """Names of the bundled photographs found on this machine, in a fixed order."""
    return list(_available())


def load_photo(name: str) -> Image.Image:
    """The full-resolution photograph as an RGB PIL image (greyscale ones replicated to RGB)."""
    if name not in _PHOTO_FILES:
        raise DataError(f"unknown photo {name!r}; known: {', '.join(_PHOTO_FILES)}")
    path = _photo_path(name)
    if path is None:
        package = _PHOTO_FILES[name][0]
        raise DataError(f"photo {name!r} not found: its package {package!r} is not installed")
    try:
        return load_rgb(path)
    except ImageReadError as e:
        raise DataError(f"photo {name!r} at {path}: {e}") from e


@cache
def _photo_tensor(name: str) -> torch.Tensor:
    im = load_photo(name)
    short = min(im.size)
    if short > _MAX_SHORT_SIDE:
        f = _MAX_SHORT_SIDE / short
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BICUBIC)
    return to_chw_uint8(np.array(im))


def heldout_view(img: torch.Tensor, view: int) -> torch.Tensor:
    """Fixed square crops: full centre, 0.6x centre zoom, 0.75x top-left, 0.75x bottom-right."""
    h, w = img.shape[-2:]
    s = min(h, w)
    if view == 0:
        side, top, left = s, (h - s) // 2, (w - s) // 2
    elif view == 1:
        side = max(1, round(0.6 * s))
        top, left = (h - side) // 2, (w - side) // 2
    elif view == 2:
        side = max(1, round(0.75 * s))
        top, left = 0, 0
    else:
        side = max(1, round(0.75 * s))
        top, left = h - side, w - side
    return img[:, top : top + side, left : left + side]


class PhotosDataset(SeededDataset):
    """Unlabeled crops of the bundled photos. Train: item i = random resized crop of photo ``i % n``
    (virtual length, default 10_000). Held-out: 4 fixed crops per photo, no randomness."""

    def __init__(
        self,
        *,
        img_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        heldout: bool,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        self.names = photo_names()
        if not self.names:
            raise DataError("no bundled photos found: install scikit-image, scikit-learn or matplotlib")
        self.heldout = heldout
        n = len(self.names)
        transform = ImageTransform(img_size, mean, std, train=not heldout, scale=(0.1, 1.0))
        source_len = n * HELDOUT_VIEWS if heldout else n
        if length is None and not heldout:
            length = 10_000
        super().__init__(task="unlabeled", transform=transform, seed=seed, source_len=source_len, length=length)

    def _load(self, src: int, i: int) -> tuple[torch.Tensor, None]:
        n = len(self.names)
        img = _photo_tensor(self.names[src % n])
        if self.heldout:
            img = heldout_view(img, src // n)
        return img, None
