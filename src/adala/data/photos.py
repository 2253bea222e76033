"""Real photographs that ship inside installed packages (scikit-image, scikit-learn, matplotlib).

They give an offline, download-free stream of natural images: enough to distil attention behaviour on
real statistics. Files are read straight from the package directories (found with ``find_spec``, without
importing the packages), so no loader can ever trigger a download. The same pool machinery serves Debian's
wallpapers (``wallpapers.py``); both are split by *source image* into train and held-out.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
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
# Held out *by source image*: these photographs never reach a training stage (``photos`` / ``wallpapers`` train
# splits exclude them), so ``photos:heldout`` / ``wallpapers:heldout`` / ``heldout`` measure unseen images.
HELDOUT_PHOTOS = ("chelsea", "coffee", "china", "grace_hopper", "motorcycle")
HELDOUT_WALLPAPERS = ("ColdRipple", "EveningGlow", "FallenLeaf", "Kite", "Path")
# Cached copies keep up to this short side: 448²–1344² crops of the 1600–2880-pixel wallpapers stay real
# high-resolution content, while memory stays ~0.4 GB for every image of the pool.
_MAX_SHORT_SIDE = 1600
HELDOUT_VIEWS = 2
COLLECTIONS = ("photos", "wallpapers", "backgrounds", "heldout")


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
    """Names of the bundled photographs found on this machine, in a fixed order (both splits)."""
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


def pool_sources(collection: str, heldout: bool) -> list[tuple[str, Path]]:
    """(name, file) of every image in ``collection``'s split, in a fixed order.

    ``photos``: the package photographs; ``wallpapers``: Debian's wallpapers (photographs and artwork);
    ``backgrounds`` (train split only): 28 photographs from Debian's desktop-background packages;
    ``heldout`` (held-out split only): the held-out photographs of both. Train splits never contain a held-out
    source, whatever the crop, so a held-out number is always on unseen images.
    """
    if collection not in COLLECTIONS:
        raise DataError(f"unknown image collection {collection!r}; known: {', '.join(COLLECTIONS)}")
    if collection == "heldout":
        if not heldout:
            raise DataError("'heldout' is an evaluation set; train on photos or wallpapers")
        return pool_sources("photos", True) + pool_sources("wallpapers", True)
    if collection == "photos":
        names = [n for n in photo_names() if (n in HELDOUT_PHOTOS) == heldout]
        if not names:
            raise DataError("no bundled photos found: install scikit-image, scikit-learn or matplotlib")
        return [(n, _photo_path(n)) for n in names]  # type: ignore[misc]
    if collection == "backgrounds":
        if heldout:
            raise DataError("backgrounds is train-only; the held-out photographs are 'heldout'")
        # lazy: a collection's files are listed only when that collection is asked for
        from .backgrounds import background_files

        return list(background_files().items())
    # lazy: a collection's files are listed only when that collection is asked for
    from .wallpapers import wallpaper_files

    files = wallpaper_files()
    chosen = [(n, p) for n, p in files.items() if (n in HELDOUT_WALLPAPERS) == heldout]
    if heldout and not chosen:
        raise DataError(f"none of the held-out wallpapers ({', '.join(HELDOUT_WALLPAPERS)}) is installed")
    return chosen


def is_heldout(name: str) -> bool:
    return name in HELDOUT_PHOTOS or name in HELDOUT_WALLPAPERS


@lru_cache(maxsize=64)
def _image_tensor(path: Path) -> torch.Tensor:
    try:
        im = load_rgb(path, min_size=_MAX_SHORT_SIDE)
    except ImageReadError as e:
        raise DataError(f"image {path}: {e}") from e
    short = min(im.size)
    if short > _MAX_SHORT_SIDE:
        f = _MAX_SHORT_SIDE / short
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BICUBIC)
    return to_chw_uint8(np.array(im))


def heldout_view(img: torch.Tensor, view: int) -> torch.Tensor:
    """Fixed square crops: the full centre square (view 0) and a 0.6× centre zoom (view 1)."""
    h, w = img.shape[-2:]
    s = min(h, w)
    side = s if view == 0 else max(1, round(0.6 * s))
    top, left = (h - side) // 2, (w - side) // 2
    return img[:, top : top + side, left : left + side]


class PhotosDataset(SeededDataset):
    """Unlabeled images of one collection. Train: item i = random resized crop of source ``i % n`` (virtual
    length, default 10_000; ``scale`` is the crop's area fraction, so large sources give crops of real
    high-resolution content). Held-out: ``HELDOUT_VIEWS`` fixed crops per source, no randomness."""

    def __init__(
        self,
        *,
        img_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        heldout: bool,
        collection: str = "photos",
        seed: int = 0,
        length: int | None = None,
        scale: tuple[float, float] | None = None,
    ) -> None:
        self.sources = pool_sources(collection, heldout)
        self.names = [n for n, _ in self.sources]
        self.collection = collection
        self.heldout = heldout
        n = len(self.sources)
        scale = scale or ((0.05, 1.0) if collection in ("wallpapers", "backgrounds") else (0.1, 1.0))
        transform = ImageTransform(img_size, mean, std, train=not heldout, scale=scale)
        source_len = n * HELDOUT_VIEWS if heldout else n
        if length is None and not heldout:
            length = 10_000
        super().__init__(task="unlabeled", transform=transform, seed=seed, source_len=source_len, length=length)

    def _load(self, src: int, i: int) -> tuple[torch.Tensor, None]:
        n = len(self.sources)
        img = _image_tensor(self.sources[src % n][1])
        if self.heldout:
            img = heldout_view(img, src // n)
        return img, None
