"""One spec string -> one dataset, so configs and the CLI name data the same way everywhere."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import DataError
from .base import TASKS
from .digits import Digits
from .fashion_mnist import FashionMNIST, _find_files
from .fashion_seg import FashionMNISTSeg
from .folder import FolderDataset, _image_files
from .photos import PhotosDataset, pool_sources
from .shards import build_wds

SPEC_FORMS = ("photos[:train|:heldout], wallpapers[:train|:heldout], backgrounds, heldout, digits[:train|:test], "
              "fashion-mnist[:train|:test], "
              "fashion-mnist-seg[-large][:train|:test], folder:PATH, wds:PATTERN")
LARGE_SEG_GRID = 8  # fashion-mnist-seg-large: 8x8 cells of 28 px (224² canvases, 16-32 items)
_PHOTO_SPLITS = {"train": False, "heldout": True, "test": True, "val": True}


class Spec(NamedTuple):
    kind: str  # photos | wallpapers | backgrounds | heldout | fashion-mnist | fashion-mnist-seg | folder | wds
    arg: str | None  # split for the built-ins, PATH / PATTERN for folder / wds


def heldout_spec(spec: Spec) -> bool:
    """Whether a photo-collection spec names held-out sources (``heldout``, ``photos:heldout``, ...)."""
    return spec.kind == "heldout" or _PHOTO_SPLITS.get(spec.arg or "train", False)


def parse_spec(spec: str) -> Spec:
    """Split ``name[:arg]``; only the first ':' separates, so paths and URLs keep theirs."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec; expected one of: {SPEC_FORMS}")
    name, sep, arg = spec.strip().partition(":")
    kind = name.strip().lower()
    if kind in ("folder", "wds"):
        if not arg.strip():
            what = "PATH" if kind == "folder" else "PATTERN"
            raise DataError(f"{kind}: needs a {what} (e.g. {kind}:/data/x)")
        return Spec(kind, arg.strip())
    if kind in ("photos", "wallpapers") and (not sep or arg.lower() in _PHOTO_SPLITS):
        return Spec(kind, arg.lower() or None)
    if kind == "backgrounds" and (not sep or arg.lower() == "train"):
        return Spec(kind, arg.lower() or None)
    if kind == "heldout" and not sep:
        return Spec(kind, "heldout")
    if kind in ("fashion-mnist", "fashion-mnist-seg", "fashion-mnist-seg-large", "digits") and (
            not sep or arg.lower() in ("train", "test")):
        return Spec(kind, arg.lower() or None)
    raise DataError(f"unknown data spec {spec!r}; expected one of: {SPEC_FORMS}")


def _check_args(task: str, img_size: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
    mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise DataError(f"mean and std need 3 values (RGB), got {mean_t} and {std_t}")
    if not all(math.isfinite(s) and s > 0 for s in std_t) or not all(math.isfinite(m) for m in mean_t):
        raise DataError(f"std must be finite and positive and mean finite, got mean={mean_t} std={std_t}")
    return mean_t, std_t


def build_dataset(
    spec: str,
    *,
    task: str,
    img_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    split: str | None = None,
    train: bool = True,
    seed: int = 0,
    length: int | None = None,
) -> torch.utils.data.Dataset:
    """Build the dataset named by ``spec`` (see SPEC_FORMS) for ``task``.

    Map-style datasets (all but ``wds:``) return item ``i`` as a pure function of ``(seed, i)``.
    ``train`` switches augmentation on; the split defaults to train/test from ``train`` and a split in the
    spec (``fashion-mnist:test``, ``photos:heldout``) wins over ``split``.
    """
    mean_t, std_t = _check_args(task, img_size, mean, std)
    kind, arg = parse_spec(spec)
    common = dict(img_size=img_size, mean=mean_t, std=std_t, seed=seed, length=length)
    if kind in ("photos", "wallpapers", "backgrounds", "heldout"):
        if task != "unlabeled":
            raise DataError(f"{kind} has no labels; use task='unlabeled' (got {task!r})")
        chosen = (arg or split or "").lower()
        if chosen and chosen not in _PHOTO_SPLITS:
            raise DataError(f"unknown {kind} split {chosen!r}; use train or heldout")

        held = heldout_spec(Spec(kind, chosen or None))
        if train and held:
            raise DataError(f"{spec!r} is an evaluation set of held-out photos; train on photos or wallpapers")
        heldout = held or not train
        return PhotosDataset(heldout=heldout, collection=kind, **common)
    if kind == "fashion-mnist":
        if task == "segmentation":
            raise DataError("fashion-mnist is a classification set; use fashion-mnist-seg for segmentation")

        split_ = arg or split or ("train" if train else "test")
        return FashionMNIST(split=split_, task=task, train=train, **common)
    if kind == "digits":
        if task == "segmentation":
            raise DataError("digits is a classification set")

        return Digits(split=arg or split or ("train" if train else "test"), task=task, train=train, **common)
    if kind in ("fashion-mnist-seg", "fashion-mnist-seg-large"):
        if task == "classification":
            raise DataError(f"{kind} is a segmentation set; use fashion-mnist for classification")

        split_ = arg or split or ("train" if train else "test")
        grid = LARGE_SEG_GRID if kind.endswith("-large") else 3
        return FashionMNISTSeg(split=split_, task=task, train=train, grid=grid, **common)
    if kind == "folder":
        return FolderDataset(arg, task=task, train=train, split=split, **common)

    return build_wds(arg, task=task, train=train, **common)  # type: ignore[arg-type]


def describe(spec: str) -> str:
    """One cheap line about what ``spec`` points at (no image decoding)."""
    kind, arg = parse_spec(spec)
    if kind in ("photos", "wallpapers", "backgrounds", "heldout"):
        held = heldout_spec(Spec(kind, arg))
        names = [n for n, _ in pool_sources(kind, held)]
        what = {"photos": "bundled real photographs", "wallpapers": "Debian wallpapers (photographs + artwork)",
                "backgrounds": "Debian desktop-background photographs",
                "heldout": "held-out real photographs"}[kind]
        return f"{kind}: {len(names)} {what}, {'held-out' if held else 'train'} split ({', '.join(names)})"
    if kind == "digits":
        return f"digits: scikit-learn handwritten digits {arg or 'train/test'} (1200 / 597 images, 8x8)"
    if kind in ("fashion-mnist", "fashion-mnist-seg", "fashion-mnist-seg-large"):
        files = _find_files(arg or "train")
        where = f"from {files[0].parent}" if files else "NOT FOUND (apt-get install dataset-fashion-mnist)"
        what = "10-class classification" if kind == "fashion-mnist" else "11-class segmentation canvases"
        return f"{kind}: Fashion-MNIST {arg or 'train/test'} {what}, {where}"
    if kind == "folder":


        root = Path(arg).expanduser()  # type: ignore[arg-type]
        if not root.is_dir():
            return f"folder: {root} (missing)"
        return f"folder: {root}, {len(_image_files(root))} image files"
    # lazy: optional dependency: webdataset (wds: specs only)
    from webdataset.shardlists import expand_urls

    return f"wds: {len(expand_urls(arg))} shards matching {arg}"
