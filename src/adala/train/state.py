"""What a checkpoint captures of a run, and how it is put back.

The optimizer state is split into tensors (safetensors) and a JSON structure; RNG states of python
``random``, numpy and torch (CPU and CUDA) are plain integer/byte tensors gathered from every rank, so
each rank continues with exactly its own random stream.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

from ..files import decode_tuples
from . import distributed as dist
from .checkpoint import FORMAT, Loaded, plain
from .logs import LogWindow
from .sampler import BatchStream


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": decode_tuples(meta["param_groups"])}


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (python/numpy states are plain integer arrays)."""
    _, py_state, py_gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if py_gauss is None else py_gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> None:
    gauss = float(states["python_gauss"][0])
    random.setstate((3, tuple(int(x) for x in states["python"].tolist()), None if math.isnan(gauss) else gauss))
    pos, has_gauss = (int(x) for x in states["numpy_meta"].tolist())
    key = states["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, pos, has_gauss, float(states["numpy_gauss"][0])))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def gather_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, keyed ``rank<r>/<name>`` (a collective: all ranks must call it)."""
    out = {}
    for name, tensor in sorted(capture_rng(device).items()):
        for r, t in enumerate(dist.all_gather(tensor)):
            out[f"rank{r}/{name}"] = t
    return out


def rng_of_rank(tensors: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor] | None:
    prefix = f"rank{r}/"
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return mine or None


@dataclass
class RunState:
    """The live objects a checkpoint snapshots: student (and any trainable tensor outside it), optimizer,
    scheduler, grad scaler, data position and RNG."""

    objective: nn.Module
    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stream: BatchStream
    device: torch.device
    ema: float = 0.0  # decay; 0 = no average

    def __post_init__(self) -> None:
        self.window = LogWindow(self.device)
        names = {id(p): n for n, p in self.objective.named_parameters()}
        self.names = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        in_student = {id(p) for p in self.student.parameters()}
        self.extra = {n: p for n, p in self.objective.named_parameters() if p.requires_grad and id(p) not in in_student}
        # EMA of the student's trained tensors. Why: with few sources, held-out fidelity swings by several points
        # between checkpoints a hundred steps apart while the training loss keeps falling; the average of the
        # trajectory sits in a flatter, better-generalising spot (Polyak averaging, as timm's ModelEmaV3).
        self.ema_params = {n: p for n, p in self.student.named_parameters() if p.requires_grad} if self.ema else {}
        self.ema_values = {n: p.detach().clone() for n, p in self.ema_params.items()}
        self.ema_in_use = False

    def update_ema(self, step: int) -> None:
        """After optimizer step ``step``: average in the live weights, with timm's warm-up of the decay so the
        first steps are not dominated by the starting point, min(decay, (1 + step) / (10 + step))."""
        if not self.ema_params:
            return
        decay = min(self.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, p in self.ema_params.items():
                self.ema_values[n].lerp_(p.detach(), 1.0 - decay)

    def use_ema(self) -> None:
        """Put the averaged weights into the student (the end of training)."""
        with torch.no_grad():
            for n, p in self.ema_params.items():
                p.copy_(self.ema_values[n])
        self.ema_in_use = bool(self.ema_params)

    def record(self, cfg: Any, stage: str, dataset: Any) -> dict:
        """What must match for a checkpoint to be resumed by this run (also stored in state.json)."""
        return {
            "stage": stage,
            "student_shapes": {k: list(v.shape) for k, v in self.student.state_dict().items()},
            "trainable": self.names,
            "adala_config": plain(getattr(self.student, "adala_config", None)),
            "run_config": plain(getattr(self.objective, "run_config", None)),
            "dataset_len": None if isinstance(dataset, IterableDataset) else len(dataset),
            "config": plain(asdict(cfg)),
        }

    def snapshot(self, step: int, record: dict) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Tensor files and JSON files of a checkpoint after ``step`` updates (collective: every rank calls)."""
        rng = gather_rng(self.device)
        opt_tensors, opt_meta = optimizer_to_files(self.optimizer)
        epoch, batch = self.stream.position
        state = {
            **record, "format": FORMAT, "step": step, "epoch": epoch, "batch": batch,
            "world_size": dist.world_size(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "extra_params": sorted(self.extra), "log_window": self.window.state(),
            "torch": torch.__version__, "time": time.time(),
        }
        student = dict(self.student.state_dict())
        live: dict[str, torch.Tensor] = {}
        if self.ema_params and not self.ema_in_use:
            # The checkpoint's student is the model to use (the average); the live weights ride along so that
            # a resume continues the exact trajectory.
            live = {f"live/{n}": p.detach() for n, p in self.ema_params.items()}
            student.update({n: v for n, v in self.ema_values.items()})
        tensors = {
            "student.safetensors": student,
            "optimizer.safetensors": {**opt_tensors, **{f"param/{n}": p for n, p in self.extra.items()}, **live},
            "rng.safetensors": rng,
        }
        return tensors, {"optimizer.json": opt_meta, "state.json": state}

    def restore(self, loaded: Loaded) -> int:
        """Put a verified, compatible checkpoint back; returns its step."""
        state = loaded.state
        self.student.load_state_dict(loaded.student, strict=True)
        with torch.no_grad():
            for n, p in self.extra.items():
                p.copy_(loaded.optimizer[f"param/{n}"])
            for n, p in self.ema_params.items():  # the student file holds the average; the live weights beside it
                self.ema_values[n].copy_(p)
                if f"live/{n}" in loaded.optimizer:
                    p.copy_(loaded.optimizer[f"live/{n}"])
        opt = {k: v for k, v in loaded.optimizer.items() if not k.startswith(("param/", "live/"))}
        self.optimizer.load_state_dict(optimizer_from_files(opt, loaded.optimizer_meta))
        self.scheduler.load_state_dict(decode_tuples(state["scheduler"]))
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state["world_size"] != dist.world_size():
            warnings.warn(f"{loaded.path.name} was written by {state['world_size']} process(es), resuming with "
                          f"{dist.world_size()}: the data order and random streams will differ", RuntimeWarning,
                          stacklevel=2)
        self.stream.seek(state["epoch"], state["batch"])
        self.window.load_state(state["log_window"])
        mine = rng_of_rank(loaded.rng, dist.rank())
        if mine is None:
            seed_all(int(state["config"]["seed"]) + dist.rank() + int(state["step"]))
        else:
            restore_rng(mine, self.device)
        return int(state["step"])
