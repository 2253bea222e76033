"""Files adala writes: atomically (temporary name, fsync, rename) and, for JSON, in one encoding.

One JSON rule for every record (metrics, eval results, bench records, logs, checkpoints' state): tensors
become numbers or lists, paths strings, and a non-finite float becomes ``null`` -- standard JSON that every
reader parses (``json.dumps`` would write ``Infinity``, which is not JSON).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from .errors import CheckpointError


def _silent_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; remove the temporary file on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        _silent_unlink(tmp)
        reason = getattr(e, "strerror", None) or str(e).split("I/O error: ")[-1]
        raise CheckpointError(f"could not write {path}: {reason}") from None
    except BaseException:
        _silent_unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def jsonable(value: Any, tuples: bool = False) -> Any:
    """``value`` as plain JSON types (see the module docstring). ``tuples=True`` keeps tuples as
    ``{"__tuple__": [...]}`` so that :func:`decode_tuples` restores them (optimizer betas in checkpoints)."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): jsonable(v, tuples) for k, v in value.items()}
    if isinstance(value, tuple) and tuples:
        return {"__tuple__": [jsonable(v, tuples) for v in value]}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, tuples) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def decode_tuples(value: Any) -> Any:
    """The inverse of ``jsonable(..., tuples=True)``."""
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(decode_tuples(x) for x in value["__tuple__"])
        return {k: decode_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_tuples(x) for x in value]
    return value


def dumps(data: Any, indent: int | None = None, sort_keys: bool = False, tuples: bool = False) -> str:
    """``data`` as JSON text under the one rule (anything else becomes its ``str``)."""
    return json.dumps(jsonable(data, tuples), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write_text(path, dumps(data, indent=indent, sort_keys=sort_keys) + "\n")
