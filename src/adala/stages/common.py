"""What the three stages share: resolving inputs, checking them before any work, the teacher-pass
recorder, datasets in the model's normalisation, TrainConfig assembly and saving a stage's output.

Every check runs before training starts, so a bad input fails in one line with nothing written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, UnsupportedModelError
from ..models.config import get_config
from ..models.families import family_of
from ..models.surgery import attention_modules, backbone_of

METRICS = "metrics.json"


@dataclass
class StageResult:
    """A stage's trained model, where it was saved, its final metrics and its logged history."""

    model: nn.Module
    out_dir: Path
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- inputs


def as_teacher(teacher: nn.Module | str | os.PathLike) -> nn.Module:
    """A frozen eval teacher from a module or a teacher spec (``adala.load_teacher`` forms)."""
    if isinstance(teacher, nn.Module):
        model = teacher
    elif isinstance(teacher, (str, os.PathLike)):
        from ..models import load_teacher

        model = load_teacher(str(teacher))
    else:
        raise ConfigError(f"teacher must be a module or a teacher spec, got {type(teacher).__name__}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def as_model(model: nn.Module | str | os.PathLike, what: str = "model") -> nn.Module:
    """A module as given, or one loaded from a directory saved by adala."""
    if isinstance(model, nn.Module):
        get_config(model)
        return model
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_model

        return load_model(model)
    raise ConfigError(f"{what} must be a module or a model directory, got {type(model).__name__}")


def trainable_copy(model: nn.Module | str | os.PathLike, what: str = "model") -> nn.Module:
    """A module to train: stages never modify a module they were given, so that is deep-copied (with its
    adala_config); a directory is simply loaded."""
    out = copy.deepcopy(model) if isinstance(model, nn.Module) else None
    out = as_model(model if out is None else out, what)
    for p in out.parameters():
        p.requires_grad_(True)
    return out.train()


def patch_size(model: nn.Module) -> int:
    cfg = getattr(model, "adala_config", None) or {}
    if cfg.get("patch_size"):
        return int(cfg["patch_size"])
    vit = backbone_of(model)
    return family_of(vit).patch_size(vit)


def check_img_size(model: nn.Module, img_size: Any, key: str = "img_size") -> int:
    p = patch_size(model)
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {img_size!r}")
    if img_size % p:
        lo, hi = (img_size // p) * p, (img_size // p + 1) * p
        near = f"{lo} or {hi}" if lo else str(hi)
        raise ConfigError(f"{key}={img_size} is not a multiple of the patch size {p} (try {near})")
    return img_size


def check_positive(value: Any, key: str, kind: type = int, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is int else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or not value > 0 or (kind is float and not math.isfinite(value)):
        raise ConfigError(f"{key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return value


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Same depth, width, heads and patch size: the student must be a re-attentioned copy of the teacher."""
    t, s = backbone_of(teacher), backbone_of(student)
    tf, sf = family_of(t), family_of(s)
    ta, sa = attention_modules(t), attention_modules(s)
    checks = [
        ("family", tf.name, sf.name),
        ("blocks", len(ta), len(sa)),
        ("embed dim", tf.embed_dim(t), sf.embed_dim(s)),
        ("heads", ta[0].num_heads, sa[0].num_heads),
        ("patch size", patch_size(t), patch_size(s)),
        ("prefix tokens", tf.num_prefix_tokens(t), sf.num_prefix_tokens(s)),
    ]
    for name, tv, sv in checks:
        if tv != sv:
            raise UnsupportedModelError(
                f"student does not match the teacher: {name} {sv} vs teacher {tv} (linearize this teacher)"
            )


# ------------------------------------------------------------------------------------------------- data


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
    from ..data import build_dataset

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


def eval_batches(ds, batch_size: int, shard: bool = True, num_workers: int = 0):
    """Deterministic, in-order batches; with ``shard`` each rank takes every world_size-th item.
    ``num_workers`` > 0 decodes the next batches in other processes while the model runs."""
    from ..train.distributed import rank, world_size

    if isinstance(ds, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    else:
        idx = list(range(len(ds)))
        if shard and world_size() > 1:
            idx = idx[rank():: world_size()]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                             num_workers=num_workers)
    yield from loader


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------------------------------- training


def train_config(*, steps: int, batch_size: int, lr: float, train_kwargs: dict[str, Any]):
    """A TrainConfig; unknown keyword arguments are named in a ConfigError rather than ignored."""
    from ..train.loop import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "batch_size", "lr"}
    unknown = sorted(set(train_kwargs) - names)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    check_positive(steps, "steps")
    check_positive(batch_size, "batch_size")
    check_positive(lr, "lr", float)
    return TrainConfig(steps=steps, batch_size=batch_size, lr=float(lr), **train_kwargs)


def out_dir(out: str | os.PathLike | None, stage: str) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f"adala-{stage}-"))
    return Path(out)


def check_out(out: Path, resume: bool) -> None:
    """Refuse to train over a finished stage or into a file; ``resume`` needs the engine's checkpoints."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if resume and not (out / "checkpoints").is_dir():
        raise ConfigError(f"--resume: {out} has no checkpoints to resume from")


def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: dict) -> None:
    from ..models.weights import atomic_write_text

    atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")


def finish(model: nn.Module, out: Path, metrics: dict, history: list[dict] | None = None,
           save: bool = True) -> StageResult:
    """Save model then ``metrics.json`` (rank 0 only): a directory with both is a finished stage."""
    from ..models import save_model
    from ..train.distributed import barrier, is_main

    model.eval()
    metrics = jsonable(metrics)
    if is_main():
        if save:
            save_model(model, out)
        else:
            out.mkdir(parents=True, exist_ok=True)
        write_json(out / METRICS, metrics)
    barrier()
    return StageResult(model=model, out_dir=out, metrics=metrics, history=list(history or []))


# ------------------------------------------------------------------------------------- teacher record


class TeacherRecorder:
    """Forward hooks on a teacher's attention modules: one teacher pass yields, for every block, the
    attention's input (``norm1(x)``, window-partitioned for SAM's windowed blocks), its keyword arguments
    (Eva's ``rope``: replayed to the student unchanged), its output, and optionally the block's own input."""

    def __init__(self, teacher: nn.Module, block_inputs: bool = False) -> None:
        self.handles = []
        vit = backbone_of(teacher)
        mods = attention_modules(vit)
        n = len(mods)
        self.attn_in: list[torch.Tensor | None] = [None] * n
        self.attn_kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
        self.attn_out: list[torch.Tensor | None] = [None] * n
        self.block_in: list[torch.Tensor | None] = [None] * n
        blocks = family_of(vit).blocks(vit)
        for i, mod in enumerate(mods):
            self.handles.append(mod.register_forward_hook(self._attn_hook(i), with_kwargs=True))
            if block_inputs:
                self.handles.append(blocks[i].register_forward_pre_hook(self._block_hook(i)))

    def _attn_hook(self, i: int):
        def hook(_mod, args, kwargs, output):
            self.attn_in[i] = args[0].detach()
            self.attn_kwargs[i] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            self.attn_out[i] = output.detach()

        return hook

    def _block_hook(self, i: int):
        def hook(_mod, args):
            self.block_in[i] = args[0].detach()

        return hook

    def clear(self) -> None:
        n = len(self.attn_in)
        self.attn_in, self.attn_out, self.block_in = [None] * n, [None] * n, [None] * n
        self.attn_kwargs = [{} for _ in range(n)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
