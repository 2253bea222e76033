"""Training checkpoints: everything needed to continue a run bit-for-bit, with no pickle.

Layout of ``<out_dir>/checkpoints/step-XXXXXXX/``:

- ``student.safetensors``: the student's state_dict;
- ``optimizer.safetensors`` + ``optimizer.json``: optimizer state tensors, and its param groups/scalars;
- ``rng.safetensors``: torch CPU/CUDA, numpy and python ``random`` states of every rank;
- ``state.json``: step, data position, scheduler and grad-scaler state, stage, config, model shapes;
- ``manifest.json``: sha256 and size of each file above, written last.

A checkpoint is written into ``step-XXXXXXX.tmp/`` and renamed once complete, so a crash or a full disk
never leaves a half-written checkpoint under the real name; ``latest`` then names it. On resume the newest
directory whose manifest verifies is used; a corrupt one is reported and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files import atomic_write_text, dumps
from ..models.weights import load_tensors, save_tensors, sha256_file

FORMAT = "adala-checkpoint/1"
MANIFEST = "manifest.json"
TENSOR_FILES = ("student.safetensors", "optimizer.safetensors", "rng.safetensors")
JSON_FILES = ("optimizer.json", "state.json")
log = logging.getLogger("adala.train")
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
# TrainConfig fields that change the trajectory; the others (logging, workers, device...) may differ on resume.
TRAJECTORY_FIELDS = (
    "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "accum_steps",
    "amp", "seed", "ema",
)
TRAJECTORY_DEFAULTS = {"ema": 0.0}  # fields added later: what a checkpoint written before them implicitly used


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every renamed (not ``.tmp``) checkpoint directory, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


# --- JSON with tuples preserved (optimizer betas), in adala's one encoding (adala.files) -----------------

def plain(obj: Any) -> Any:
    """The JSON round trip of ``obj``, for comparing a live value with its saved form."""
    return json.loads(dumps(obj, tuples=True))


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(obj, indent=1, sort_keys=True, tuples=True))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- writing --------------------------------------------------------------------------------------------

def write_checkpoint(
    root: Path, step: int, tensor_files: dict[str, dict[str, torch.Tensor]], json_files: dict[str, Any],
    keep: int,
) -> Path:
    """Write a complete checkpoint directory atomically, point ``latest`` at it, prune to ``keep``."""
    final = root / step_name(step)
    tmp = root / (final.name + ".tmp")
    previous = complete_checkpoints(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, tensors in tensor_files.items():
            save_tensors(tensors, tmp / name)
        for name, obj in json_files.items():
            _write_json(tmp / name, obj)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
        _fsync_dir(tmp)
        if final.exists():  # an unverifiable leftover of this same step (we resumed from an older one)
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except OSError as e:  # CheckpointError is an OSError too
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if type(e) is OSError and e.strerror else str(e)
        kept = f"{previous[-1][1].name} is untouched" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final}: {reason}; {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in complete_checkpoints(root)[:-keep]:
        try:
            _discard(old)
        except OSError:
            pass  # pruning is housekeeping; the new checkpoint is complete
    return final


def _discard(path: Path) -> None:
    """Rename out of the ``step-*`` namespace, then delete: a kill mid-delete leaves no partial checkpoint."""
    trash = path.with_name(path.name + ".deleting")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(root: Path) -> None:
    """Drop ``.tmp``/``.deleting`` directories left by a run killed while writing or pruning."""
    if root.is_dir():
        for p in [*root.glob("step-*.tmp"), *root.glob("step-*.deleting")]:
            shutil.rmtree(p, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    path: Path
    state: dict
    optimizer_meta: dict
    student: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def verify(path: Path) -> str | None:
    """None when every file in the manifest is present with its recorded size and sha256; else the problem."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (incomplete checkpoint)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name in TENSOR_FILES + JSON_FILES:
        if name not in files:
            return f"{path / name} is not listed in the manifest"
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{p} is truncated or corrupt ({p.stat().st_size} bytes, expected {info['bytes']})"
        if sha256_file(p) != info["sha256"]:
            return f"{p} is corrupt (sha256 mismatch)"
    return None


def load_checkpoint(path: Path) -> Loaded:
    def read_json(name: str) -> dict:
        try:
            return json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / name} is unreadable ({e})") from None

    return Loaded(
        path=path, state=read_json("state.json"), optimizer_meta=read_json("optimizer.json"),
        student=load_tensors(path / "student.safetensors", verify=False),
        optimizer=load_tensors(path / "optimizer.safetensors", verify=False),
        rng=load_tensors(path / "rng.safetensors", verify=False),
    )


def find_latest(root: Path) -> tuple[Loaded | None, list[Path]]:
    """The newest checkpoint that verifies and loads, and the newer ones skipped (each warned about)."""
    skipped: list[Path] = []
    for _, path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            try:
                return load_checkpoint(path), skipped
            except CheckpointError as e:
                problem = str(e)
        warnings.warn(f"checkpoint {path.name} skipped: {problem}; trying an older one", RuntimeWarning,
                      stacklevel=3)
        skipped.append(path)
    return None, skipped


def quarantine(paths: list[Path]) -> None:
    """Rename skipped (corrupt) checkpoints to ``*.corrupt`` so pruning and re-writing leave them alone."""
    for p in paths:
        target = p.with_name(p.name + ".corrupt")
        n = 1
        while target.exists():
            target, n = p.with_name(f"{p.name}.corrupt{n}"), n + 1
        try:
            os.replace(p, target)
        except OSError:
            pass


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _changes(old: Any, new: Any) -> str:
    """``img_size 56 -> 84, loss 'mse' -> 'cosine'`` for two run_config mappings (keys in sorted order)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{_short(old)} -> {_short(new)}"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys)


def check_compatible(saved: dict, expected: dict, path: Path) -> None:
    """Refuse (one line, nothing written) to continue a checkpoint from another stage, model or config."""
    where = f"cannot resume from {path}"
    hint = "use a new --out (or run without --resume / resume=False in an empty one)"
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format {saved.get('format')!r}")
    if saved.get("stage") != expected["stage"]:
        raise CheckpointError(f"{where}: it was written by stage {saved.get('stage')!r}, "
                              f"not {expected['stage']!r}; {hint}")
    shapes, want = saved.get("student_shapes", {}), expected["student_shapes"]
    if shapes != want:
        diff = sorted(set(shapes) ^ set(want)) or sorted(k for k in want if shapes[k] != want[k])
        k = diff[0]
        raise CheckpointError(f"{where}: the student differs ({k}: {shapes.get(k)} in the checkpoint, "
                              f"{want.get(k)} now); {hint}")
    if saved.get("run_config") is None and expected["run_config"] is not None:
        log.warning("%s predates recorded stage options: img_size, loss, data... cannot be checked on this resume",
                    path.name)
    elif saved.get("run_config") != expected["run_config"]:
        raise CheckpointError(f"{where}: the stage options differ "
                              f"({_changes(saved.get('run_config'), expected['run_config'])}); {hint}")
    for key, label in (("adala_config", "model config"),
                       ("trainable", "set of trainable parameters"), ("dataset_len", "dataset length")):
        if saved.get(key) != expected[key]:
            raise CheckpointError(f"{where}: the {label} differs from the checkpoint's; {hint}")
    old, new = saved.get("config", {}), expected["config"]
    changed = [f"{f} {old.get(f, TRAJECTORY_DEFAULTS.get(f))!r} -> {new[f]!r}" for f in TRAJECTORY_FIELDS
               if old.get(f, TRAJECTORY_DEFAULTS.get(f)) != new[f]]
    if changed:
        raise CheckpointError(f"{where}: the training config differs ({', '.join(changed)}); {hint}")
