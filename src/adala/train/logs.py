"""Run logs: ``out_dir/log.jsonl`` (one JSON object per line) and TensorBoard under ``out_dir/tb``.

Only rank 0 writes. Each record is appended with a single write so a killed run leaves whole lines; readers
skip a torn last line anyway.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

import torch

from ..files import dumps
from . import distributed as dist

LOG_NAME = "log.jsonl"
log = logging.getLogger("adala.train")
_unwritable: set[str] = set()  # log files already reported: one line per file, not one per record


def log_event(out_dir: str | Path, record: dict) -> None:
    """Append one record (e.g. ``{"event": "skipped_image", "path": ...}``) to ``out_dir/log.jsonl``.

    A ``time`` field (unix seconds) is added when missing. No-op on ranks other than 0.
    """
    if not dist.is_main():
        return
    path = Path(out_dir) / LOG_NAME
    rec = dict(record)
    rec.setdefault("time", round(time.time(), 3))
    line = dumps(rec) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:  # a log line is not worth a crash; checkpoint writes report a full disk loudly
        if str(path) not in _unwritable:  # a logged line, not a RuntimeWarning with its source line
            _unwritable.add(str(path))
            log.warning("could not append to %s: %s (its later lines are dropped too)", path,
                        e.strerror or e)


def read_log(out_dir: str | Path) -> list[dict]:
    """Every whole JSON line of ``out_dir/log.jsonl`` (empty when there is none)."""
    path = Path(out_dir) / LOG_NAME
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class TensorBoard:
    """Scalars to ``out_dir/tb``; silently absent when tensorboard cannot be imported."""

    def __init__(self, out_dir: Path, purge_step: int | None = None):
        self.writer = None
        try:
            # lazy: optional dependency: tensorboard
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is a dependency, but logging must not stop a run
            warnings.warn(f"TensorBoard logging disabled: {e}", RuntimeWarning, stacklevel=2)
            return
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)

    def scalars(self, record: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LogWindow:
    """Sums of loss/metrics since the last log line, kept on the device (no host sync per step).

    Its state goes into checkpoints, so the first line logged after a resume averages the same steps as
    in an uninterrupted run.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.grad_norm, self.t0 = 0, 0.0, 0.0, time.perf_counter()
        self.metrics: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add_metrics(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, device=self.device).float()
            self.metrics[k] = self.metrics.get(k, 0.0) + v.mean()
            self.counts[k] = self.counts.get(k, 0) + 1

    def add_step(self, loss: float, grad_norm: float) -> None:
        """``loss`` already averaged over ranks; a non-finite grad norm (an fp16 skipped step) counts as 0."""
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm if math.isfinite(grad_norm) else 0.0

    def _rank_mean_sums(self) -> tuple[list[str], list[float]]:
        keys = sorted(self.metrics)
        if not keys:
            return keys, []
        return keys, dist.all_reduce_mean(torch.stack([self.metrics[k].reshape(()) for k in keys])).tolist()

    def summary(self, images_per_step: int) -> dict:
        """Means over the window (metrics also over ranks: a collective) and throughput."""
        keys, sums = self._rank_mean_sums()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {"loss": self.loss / max(self.steps, 1), **{k: v / self.counts[k] for k, v in zip(keys, sums)},
                "grad_norm": self.grad_norm / max(self.steps, 1),
                "imgs_per_s": images_per_step * self.steps / elapsed}

    def state(self) -> dict:
        """JSON-able state (metric sums averaged over ranks: a collective)."""
        keys, sums = self._rank_mean_sums()
        return {"steps": self.steps, "loss": self.loss, "grad_norm": self.grad_norm,
                "metrics": dict(zip(keys, sums)), "counts": {k: self.counts[k] for k in keys}}

    def load_state(self, state: dict) -> None:
        self.reset()
        self.steps, self.loss, self.grad_norm = state["steps"], state["loss"], state["grad_norm"]
        self.metrics = {k: torch.tensor(v, device=self.device) for k, v in state["metrics"].items()}
        self.counts = dict(state["counts"])
