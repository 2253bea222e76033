"""WebDataset tar shards (``wds:PATTERN``) for corpora too large for a folder scan (e.g. ImageNet-22k).

Streaming, so this is an ``IterableDataset``: shards are split across nodes and DataLoader workers, bad
samples are skipped and recorded (``dataset.skipped``, and the training loop lists them in ``log.jsonl``
with one summary line on stderr, as for folders) instead of a warning per sample. Determinism is kept
where a stream allows it: shard order is a seeded per-epoch shuffle, and a sample's augmentation is
seeded by ``(seed, its __key__)``, not by stream position.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import SkipRecorder
from .images import ImageReadError, load_rgb
from .transforms import SALT_AUG, ImageTransform, item_generator, to_chw_uint8

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_SHUFFLE_SHARDS = 100
_SHUFFLE_SAMPLES = 1000


class _SkipAndRecord:
    """webdataset error handler: note the bad sample and go on (``wds.warn_and_continue`` would print a
    multi-line UserWarning per sample and sleep 0.5 s). Picklable for DataLoader workers."""

    def __init__(self, recorder: SkipRecorder, stage: str) -> None:
        self.recorder, self.stage = recorder, stage

    def __call__(self, exn: BaseException) -> bool:
        where = getattr(exn, "sample_key", None) or self.stage
        reason = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        self.recorder.note(str(where), reason)
        return True


class _Decode:
    """Picklable sample decoder (DataLoader workers pickle the pipeline)."""

    def __init__(self, task: str, transform: ImageTransform, seed: int) -> None:
        self.task, self.transform, self.seed = task, transform, seed

    def __call__(self, sample: dict):
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise ImageReadError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_KEYS)})")
        key = str(sample.get("__key__", ""))
        where = f"{sample.get('__url__', '?')}:{key}"
        try:
            img = to_chw_uint8(np.array(load_rgb(bytes(data), min_size=self.transform.img_size)))
        except ImageReadError as e:
            e.sample_key = where
            raise
        g = item_generator(self.seed, zlib.crc32(key.encode()), SALT_AUG)
        x, _ = self.transform(img, None, g)
        if self.task == "unlabeled":
            return x
        if "cls" not in sample:
            raise ImageReadError(f"sample {key!r} has no 'cls' label")
        return x, int(bytes(sample["cls"]).decode().strip())


def _read_class_names(urls: list[str]) -> list[str] | None:
    """Optional ``classes.txt`` beside the (local) shards gives num_classes/class_names."""
    path = Path(urls[0]).parent / "classes.txt"
    try:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError:
        return None
    return names or None


def build_wds(
    pattern: str,
    *,
    task: str,
    img_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    train: bool,
    seed: int = 0,
    length: int | None = None,
) -> torch.utils.data.IterableDataset:
    # lazy: optional dependency: webdataset (wds: specs only)
    import webdataset as wds
    from webdataset.shardlists import expand_urls

    if task == "segmentation":
        raise DataError("wds: supports task 'unlabeled' or 'classification', not segmentation")
    urls = expand_urls(pattern)
    if not urls:
        raise DataError(f"wds pattern {pattern!r} matches no shards")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise DataError(f"wds shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    transform = ImageTransform(img_size, mean, std, train=train, scale=(0.35, 1.0))
    recorder = SkipRecorder()
    ds = wds.WebDataset(
        urls,
        shardshuffle=min(_SHUFFLE_SHARDS, len(urls)) if train else False,
        detshuffle=True,
        seed=seed,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        handler=_SkipAndRecord(recorder, f"{pattern} (reading a shard)"),
    )
    if train:
        ds = ds.shuffle(_SHUFFLE_SAMPLES, seed=seed)
    ds = ds.map(_Decode(task, transform, seed), handler=_SkipAndRecord(recorder, f"{pattern} (decoding)"))
    if length is not None:
        ds = ds.with_epoch(length).with_length(length, silent=True)
    ds.task = task
    ds.urls = urls
    ds.skip_recorder = recorder
    ds.skipped = recorder.skipped
    names = _read_class_names(urls) if task == "classification" and local else None
    ds.class_names = names or []
    ds.num_classes = len(names) if names else None
    return ds
