"""Datasets in a model's own normalisation (its config's mean/std), as the stages, ``evaluate`` and the
report read them; an empty source fails here, before any training."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_positive
from ..errors import DataError
from ..models.config import get_config
from .build import build_dataset


class MixedDataset(torch.utils.data.Dataset):
    """An equal mixture of map-style datasets: item ``i`` is item ``i // k`` (wrapping) of source ``i % k``.

    Lets alignment see several image domains (e.g. natural photos and the target task's unlabeled images)
    in every batch, still as a pure function of the index.
    """

    def __init__(self, parts: list[torch.utils.data.Dataset]) -> None:
        self.parts = parts
        self.length = len(parts) * max(len(p) for p in parts)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        part = self.parts[i % len(self.parts)]
        return part[(i // len(self.parts)) % len(part)]

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            if hasattr(p, "set_epoch"):
                p.set_epoch(epoch)


def dataset(model: nn.Module, spec: str | list[str], *, task: str, img_size: int, train: bool, seed: int = 0,
            length: int | None = None) -> torch.utils.data.Dataset:
    """``spec`` in the model's own normalisation; an empty source fails here, before any training.

    A list of specs (unlabeled data only) gives an equal :class:`MixedDataset`; ``length`` caps each part.
    """
    if length is not None:
        check_positive(length, "length")
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise DataError("empty list of data specs")
        if len(spec) > 1:
            if task != "unlabeled":
                raise DataError(f"a mixture of data specs is only for unlabeled data, not {task}")
            parts = [dataset(model, s, task=task, img_size=img_size, train=train, seed=seed, length=length)
                     for s in spec]
            if any(isinstance(p, torch.utils.data.IterableDataset) for p in parts):
                raise DataError("streaming (wds:) data cannot be mixed with other data")
            return MixedDataset(parts)
        spec = spec[0]
    cfg = get_config(model)
    ds = build_dataset(spec, task=task, img_size=img_size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                       train=train, seed=seed, length=length)
    if hasattr(ds, "__len__") and not isinstance(ds, torch.utils.data.IterableDataset) and len(ds) == 0:
        raise DataError(f"data {spec!r} has no items")
    return ds
