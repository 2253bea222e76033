"""Shared map-style dataset machinery: index mapping, per-item seeding and task-shaped outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .transforms import SALT_AUG, SALT_SUBSET, ImageTransform, item_generator

TASKS = ("unlabeled", "classification", "segmentation")
# The label of a segmentation pixel that belongs to no class (VOC's border value): losses and metrics skip it.
IGNORE_INDEX = 255
# The subset permutation ignores ``seed`` on purpose: a ``length``-capped eval set is then the same images
# in every run, whatever the training seed.
_SUBSET_SEED = 20240917


class SeededDataset(Dataset):
    """Map-style dataset whose item ``i`` is a pure function of ``(seed, epoch, i)`` (epoch defaults to 0).

    Subclasses provide ``source_len`` and ``_load(src, i) -> (uint8 (3,H,W) image, target)`` where target is
    an int label, an (H,W) integer mask, or None. ``length``: ``None`` = every source item; fewer = the first
    ``length`` of a fixed permutation (deterministic, roughly class-balanced); more = wrap around, each
    repeat getting fresh (still deterministic) augmentation.
    """

    task: str
    num_classes: int | None = None
    class_names: list[str]

    def __init__(self, *, task: str, transform: ImageTransform, seed: int, source_len: int, length: int | None) -> None:
        if length is not None and length <= 0:
            raise DataError(f"length must be positive, got {length}")
        self.task = task
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.source_len = source_len
        self.length = source_len if length is None else int(length)
        self._perm: np.ndarray | None = None
        if self.length < source_len:
            perm = np.random.default_rng(_SUBSET_SEED + SALT_SUBSET).permutation(source_len)
            self._perm = perm[: self.length]
        if task == "unlabeled":
            self.num_classes, self.class_names = None, []

    def _set_classes(self, names: list[str]) -> None:
        """Labelled sources call this; in the unlabeled task the labels are dropped, so nothing is exposed."""
        if self.task != "unlabeled":
            self.class_names = list(names)
            self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Opt-in fresh augmentation per epoch (with non-persistent workers); content stays the same."""
        self.epoch = int(epoch)

    def source_index(self, i: int) -> int:
        if self._perm is not None:
            return int(self._perm[i])
        return i % self.source_len

    def _load(self, src: int, i: int) -> tuple[torch.Tensor, int | torch.Tensor | None]:
        raise NotImplementedError

    def __getitem__(self, i: int):  # type: ignore[override]
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for dataset of length {self.length}")
        img, target = self._load(self.source_index(i), i)
        g = item_generator(self.seed, self.epoch, i, SALT_AUG)
        mask = target if self.task == "segmentation" else None
        x, m = self.transform(img, mask, g)
        if self.task == "unlabeled":
            return x
        if self.task == "segmentation":
            return x, m
        return x, int(target)  # type: ignore[arg-type]


class SkipRecorder:
    """Where a dataset notes the samples it had to skip while being read.

    ``skipped`` holds ``(path or key, reason)`` in this process. A scan at construction time is seen by the
    training loop directly, but skips found while iterating can happen in DataLoader worker processes, whose
    memory the loop never sees; so once the loop names a ``sink`` file, every skip is also appended there
    as one JSON line (a single ``O_APPEND`` write, whole even with several writers), and the loop lists
    them in ``log.jsonl`` when the run ends. Picklable, so workers get a copy that writes to the same sink.
    """

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []
        self.sink: str | None = None

    def note(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        if self.sink is None:
            return

        line = (json.dumps({"path": path, "reason": reason}) + "\n").encode()
        try:
            fd = os.open(self.sink, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            pass  # the in-process list still has it; the loop reports what reached the sink


def set_skip_sink(dataset, sink: str | None) -> bool:
    """Point ``dataset``'s (and a mixture's parts') skip recorder at ``sink``; whether any had one."""
    found = False
    for ds in [dataset, *getattr(dataset, "parts", [])]:
        rec = getattr(ds, "skip_recorder", None)
        if isinstance(rec, SkipRecorder):
            rec.sink = sink
            found = True
    return found
