"""The training engine shared by every stage: one loop, checkpoints with exact resume, DDP, logs."""

from __future__ import annotations

from .distributed import all_reduce_mean, barrier, init_from_env, is_main, rank, world_size
from .logs import log_event, read_log
from .loop import TrainConfig, TrainResult, train

__all__ = [
    "TrainConfig", "TrainResult", "all_reduce_mean", "barrier", "init_from_env", "is_main", "log_event", "rank",
    "read_log", "train", "world_size",
]
