"""Safetensors-only weight files, written atomically and verified on load.

A file is written to a temporary name in the same directory, fsynced and renamed, so a crash or a
full disk never leaves a half-written file under the real name. Its sha256 is stored next to it
(``<name>.sha256``) and checked on load, so a truncated or corrupted file is reported, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_write, atomic_write_text

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write a safetensors file atomically plus its ``.sha256`` record; returns the digest."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    digest = sha256_file(path)
    atomic_write_text(str(path) + ".sha256", digest + "\n")
    return digest


def refuse_pickle(path: str | os.PathLike) -> None:
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: pickle files can run code and are not loaded; convert to safetensors "
            "(or pass --allow-pickle where a command offers it)"
        )


def load_tensors(path: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its ``.sha256`` record when one exists."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    record = Path(str(path) + ".sha256")
    if verify and record.is_file():
        expected = record.read_text().strip()
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path} is corrupt (checksum mismatch)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_pickle_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Only for an explicit --allow-pickle: tensors only, never arbitrary objects."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


