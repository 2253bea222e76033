"""What the three stages share: resolving inputs, checking them before any work, the teacher-pass
recorder, datasets in the model's normalisation, TrainConfig assembly and saving a stage's output.

Every check runs before training starts, so a bad input fails in one line with nothing written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
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
    already_finished: bool = False  # ``resume`` found the stage finished: nothing was trained or written


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


def is_finished(out: Path) -> bool:
    """A finished stage: ``finish`` writes the model, then ``metrics.json`` last."""
    return (out / "adala.json").is_file() and (out / METRICS).is_file()


@contextlib.contextmanager
def claim_output(out: Path, stage: str, *, resume: bool, force: bool,
                 inputs: Iterable[tuple[str, Any]] = ()) -> Iterator[Path]:
    """Check ``out`` (not an input, not a stranger's directory, creatable; see :mod:`adala.outdir`), then
    hold its run lock for the ``with`` body. Runs first in a stage, before any model or data is loaded, so a
    second run on the same directory fails at once and a refused directory is never touched."""
    from ..outdir import check_target, claim

    if not isinstance(force, bool):
        raise ConfigError(f"force must be true or false, got {force!r}")
    check_target(out, inputs, force=force)
    check_out(out, resume)
    with claim(out, stage):
        yield out


def stage_options(teacher: nn.Module | None, **options: Any) -> dict[str, Any]:
    """The stage options that shape the optimisation problem, recorded in every checkpoint and compared on
    resume (``objective.run_config``): the image size, loss, trainable set, data and the teacher's identity
    (its config, which names the spec and, for a saved model, the weights' sha256). TrainConfig fields
    (lr, steps, batch size, seed, ...) are compared by the engine itself."""
    record = dict(options)
    if teacher is not None:
        cfg = dict(getattr(teacher, "adala_config", None) or {})
        cfg.pop("adala_version", None)  # upgrading adala does not change the teacher
        record["teacher"] = cfg
    return record


def finished_result(student: nn.Module, out: Path, history: list[dict]) -> StageResult:
    """The result of ``resume`` on a finished stage: its stored metrics, nothing rewritten."""
    try:
        metrics = json.loads((out / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{out / METRICS} is unreadable ({e})") from None
    student.eval()
    return StageResult(model=student, out_dir=out, metrics=metrics, history=list(history),
                       already_finished=True)


# Lower bound on what one training sample keeps per block for the backward pass, in units of tokens x width:
# at least the block's input and its attention output (stage 1 keeps exactly these two per block from the
# teacher pass). Inference keeps one block's MLP hidden layer (4 x width) alive at a time.
_TRAIN_KEPT, _INFER_KEPT = 2, 4


def activation_bytes(model: nn.Module, img_size: int, batch_size: int, *, train: bool,
                     element_bytes: int = 4) -> tuple[int, int]:
    """A lower bound on the activation memory of one step at ``img_size`` (and the token count).

    It counts only tensors that certainly exist (see ``_TRAIN_KEPT``), so a refusal based on it is never
    wrong; the real peak is several times higher.
    """
    vit = backbone_of(model)
    p = patch_size(model)
    tokens = (img_size // p) ** 2 + int(getattr(vit, "num_prefix_tokens", 1))
    width, depth = int(vit.embed_dim), len(vit.blocks)
    kept = _TRAIN_KEPT * depth if train else _INFER_KEPT
    image = 3 * img_size * img_size * 4  # the decoded, normalised float32 input
    return batch_size * (tokens * width * kept * element_bytes + image), tokens


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes a run can still allocate on ``device`` (None when unknown) and a word for where."""
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free), f"free on {device}"
        except (RuntimeError, AssertionError):
            return None, str(device)
    avail: int | None = None
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
        if "MemAvailable" in info:
            avail = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None, "RAM"
    try:  # a container's memory limit (cgroup v2) can be far below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail, "of RAM available"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.0f} MiB"


def check_fits(model: nn.Module, img_size: int, batch_size: int, device: str | torch.device = "auto", *,
               train: bool = True, amp: str = "auto", key: str = "img_size") -> None:
    """Refuse, before any data is decoded, a size whose activations cannot fit in the device's memory
    (instead of an allocator failure halfway into the first step)."""
    dev = pick_device(device) if isinstance(device, str) else device
    half = amp in ("bf16", "fp16") or (amp == "auto" and dev.type == "cuda")
    need, tokens = activation_bytes(model, img_size, batch_size, train=train, element_bytes=2 if half else 4)
    avail, where = available_memory(dev)
    if avail is not None and need > avail:
        vit = backbone_of(model)
        raise ConfigError(
            f"{key}={img_size} cannot fit: {tokens:,} tokens x {int(vit.embed_dim)} wide x {len(vit.blocks)} blocks "
            f"x batch {batch_size} need at least {_gib(need)} of activations"
            f"{' for training' if train else ''}, {_gib(avail)} {where}; use a smaller {key} or batch size")


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
