"""Image folders on disk, read according to the task.

* classification: ImageFolder layout ``PATH/<class>/**/<image>``, classes = sorted sub-folder names;
* unlabeled: every image under PATH, recursively (only ``PATH/images`` when PATH is a segmentation folder);
* segmentation: ``PATH/images/**/<stem>.*`` with ``PATH/masks/**/<stem>.png`` label maps (255 = ignore)
  and optional ``PATH/classes.txt`` (one name per line).

Unusable files never crash a run: they are found by a cheap scan at construction, or at load time when the
scan could not tell, and recorded in ``dataset.skipped`` as ``(path, reason)``. A file that fails at load
time is replaced by the next readable one (deterministic; such late skips are recorded per process).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .base import IGNORE_INDEX, SeededDataset, SkipRecorder
from .images import ImageReadError, check_image, is_image_file, load_label_map, load_rgb
from .transforms import ImageTransform, to_chw_uint8

_MASK_MODE = "single-channel label map"  # in load_label_map's error for an RGB/RGBA/... mask


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root`` in sorted order, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if is_image_file(Path(f))]
    return sorted(found)


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


class FolderDataset(SeededDataset):
    """See the module docstring. ``split``: use ``PATH/<split>`` when that sub-folder exists."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        task: str,
        img_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        train: bool,
        seed: int = 0,
        length: int | None = None,
        split: str | None = None,
    ) -> None:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"folder not found: {root}")
        if not root.is_dir():
            raise DataError(f"not a folder: {root}")
        if split and (root / split).is_dir():
            root = root / split
        self.root = root
        self.skip_recorder = SkipRecorder()
        self.skipped: list[tuple[str, str]] = self.skip_recorder.skipped
        self._bad: set[int] = set()
        self.masks: list[Path] = []
        names: list[str] = []
        if task == "classification":
            self.files, self.labels, names = self._scan_classes(root)
        elif task == "segmentation":
            self.files, self.masks, names = self._scan_segmentation(root)
            self.labels = []
        else:
            seg_layout = (root / "images").is_dir() and (root / "masks").is_dir()
            candidates = _image_files(root / "images" if seg_layout else root)
            self.files = [p for p in candidates if self._usable(p)]
            self.labels = []
        if not self.files:
            raise DataError(self._nothing_usable(root, task))
        self._min_side = img_size * 2 if train else img_size  # JPEG draft decoding keeps this resolution
        transform = ImageTransform(img_size, mean, std, train=train, scale=(0.35, 1.0))
        super().__init__(task=task, transform=transform, seed=seed, source_len=len(self.files), length=length)
        self._set_classes(names)

    def _nothing_usable(self, root: Path, task: str) -> str:
        """Why no item is usable, naming the most common cause: masks that are colour images rather than
        label maps are a layout mistake, not unreadable files."""
        bad_masks = [(p, r) for p, r in self.skipped if _MASK_MODE in r]
        if task == "segmentation" and bad_masks:
            path, reason = bad_masks[0]
            mode = reason.rsplit("mode ", 1)[-1]
            return (f"no usable image/mask pairs in {root}: {len(bad_masks)} of {len(self.skipped)} masks are "
                    f"not single-channel label maps (e.g. the mask of {Path(path).name} has mode {mode}); save "
                    "each mask as an L or P mode PNG of class ids (255 = ignore)")
        extra = f" ({len(self.skipped)} unreadable files skipped)" if self.skipped else ""
        return f"no images found in {root}{extra}"

    # -- construction-time scanning -------------------------------------------------------------------
    def _usable(self, path: Path) -> bool:
        reason = check_image(path)
        if reason is not None:
            self.skipped.append((str(path), reason))
        return reason is None

    def _scan_classes(self, root: Path) -> tuple[list[Path], list[int], list[str]]:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataError(f"no class sub-folders in {root} (expected {root}/<class>/<image>)")
        files, labels = [], []
        for label, name in enumerate(classes):
            for p in _image_files(root / name):
                if self._usable(p):
                    files.append(p)
                    labels.append(label)
        return files, labels, classes

    def _scan_segmentation(self, root: Path) -> tuple[list[Path], list[Path], list[str]]:
        images_dir, masks_dir = root / "images", root / "masks"
        if not images_dir.is_dir():
            raise DataError(f"segmentation folder needs {images_dir}/ and {masks_dir}/")
        names: list[str] | None = None
        if (root / "classes.txt").is_file():
            lines = (root / "classes.txt").read_text(encoding="utf-8").splitlines()
            names = [ln.strip() for ln in lines if ln.strip()]
            if not names:
                raise DataError(f"{root / 'classes.txt'} lists no classes")
        files, masks, max_label = [], [], -1
        for img in _image_files(images_dir):
            mask = (masks_dir / img.relative_to(images_dir)).with_suffix(".png")
            reason = self._check_pair(img, mask, names)
            if isinstance(reason, str):
                self.skipped.append((str(img), reason))
                continue
            files.append(img)
            masks.append(mask)
            max_label = max(max_label, reason)
        if names is None:
            names = [f"class_{k}" for k in range(max(max_label + 1, 1))]
        return files, masks, names

    @staticmethod
    def _check_pair(img: Path, mask: Path, names: list[str] | None) -> str | int:
        """A skip reason, or the largest non-ignore label in the mask (-1 when it has none)."""
        reason = check_image(img)
        if reason is not None:
            return reason
        if not mask.is_file():
            return f"missing mask {mask}"
        try:
            labels = load_label_map(mask)
        except ImageReadError as e:
            return f"mask {mask.name}: {e}"
        mh, mw = labels.shape
        w, h = _header_size(img)
        if (mw, mh) != (w, h):
            return f"mask size {mw}x{mh} differs from image size {w}x{h}"
        values = np.unique(labels)
        values = values[values != IGNORE_INDEX]
        if names is not None:
            bad = values[(values < 0) | (values >= len(names))]
            if bad.size:
                return f"mask labels {bad[:5].tolist()} outside 0..{len(names) - 1} (classes.txt)"
        return int(values.max()) if values.size else -1

    # -- item loading ---------------------------------------------------------------------------------
    def _load(self, src: int, i: int) -> tuple[torch.Tensor, int | torch.Tensor | None]:
        n = len(self.files)
        for step in range(n):
            j = (src + step) % n
            if j in self._bad:
                continue
            try:
                return self._load_one(j)
            except ImageReadError as e:
                self._bad.add(j)
                self.skip_recorder.note(str(self.files[j]), f"at load time: {e}")
        raise DataError(f"no readable images left in {self.root}")

    def _load_one(self, j: int) -> tuple[torch.Tensor, int | torch.Tensor | None]:
        if self.task == "segmentation":
            img = load_rgb(self.files[j], exif=False)
            mask = load_label_map(self.masks[j])
            if mask.shape != (img.height, img.width):
                raise ImageReadError(f"mask size {mask.shape[::-1]} differs from image size {img.size}")
            return to_chw_uint8(np.array(img)), torch.from_numpy(mask)
        img = load_rgb(self.files[j], min_size=self._min_side)
        label = self.labels[j] if self.task == "classification" else None
        return to_chw_uint8(np.array(img)), label
