"""A tiny training run for the engine tests, usable in-process (import) or as a script (subprocess/torchrun).

The objective draws from every RNG the checkpoint must restore (torch dropout, numpy, python ``random``) and
holds a frozen "teacher", so a resumed run only matches an uninterrupted one if all of them come back.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset


class SyntheticData(Dataset):
    """Item ``i`` is a pure function of ``i``: (x (8,), y (2,))."""

    def __init__(self, n: int = 40):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(1000 + int(i))
        x = torch.randn(8, generator=g)
        return x, torch.stack([x[:4].sum(), x[4:].sum() * 0.5]) + 0.1 * torch.randn(2, generator=g)


class MLPObjective(nn.Module):
    """MSE of a small MLP student against targets; knobs inject failures at a given forward call."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1, nan_at: int | None = None,
                 inf_grad_at: int | None = None, crash_at: int | None = None, sleep: float = 0.0,
                 noise: bool = True, extra: bool = False):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(8, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 2))
        self.teacher = nn.Linear(8, 2).requires_grad_(False)
        self.nan_at, self.inf_grad_at, self.crash_at, self.sleep = nan_at, inf_grad_at, crash_at, sleep
        self.noise = noise
        # a trainable tensor outside the student (like a projection head used only for training)
        self.scale = nn.Parameter(torch.ones(2)) if extra else None
        self.dtypes: list[torch.dtype] = []  # dtype of the student's output per call (autocast check)
        self.calls, self._poison = 0, False
        # The last bias's gradient becomes inf during the backward of call ``inf_grad_at``.
        self.student[3].bias.register_hook(lambda g: torch.full_like(g, float("inf")) if self._poison else g)
        self.seen: list[torch.Tensor] = []  # the x of every batch, to check data order

    def forward(self, batch):
        x, y = batch
        self.calls += 1
        self.modes = (self.student.training, self.teacher.training)
        self.seen.append(x.detach().cpu())
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        if self.sleep:
            time.sleep(self.sleep)
        noise = 1.0 + 1e-2 * float(np.random.randn()) + 1e-2 * random.random() if self.noise else 1.0
        target = y + 0.1 * self.teacher(x)
        pred = self.student(x)
        if self.scale is not None:
            pred = pred * self.scale
        self.dtypes.append(pred.dtype)
        self._poison = self.calls == self.inf_grad_at
        loss = ((pred.float() - target) ** 2).mean() * noise
        if self.nan_at is not None and self.calls == self.nan_at:
            loss = loss * float("nan")
        return loss, {"mae": (pred - target).abs().mean().detach(), "const": 2.0}


def build(seed: int = 0, **kwargs) -> MLPObjective:
    torch.manual_seed(seed)
    return MLPObjective(**kwargs)


def kill_inside_checkpoint(step: int) -> None:
    """SIGKILL this process while it writes checkpoint ``step``, after the student file is on disk."""
    from adala.train import checkpoint

    real = checkpoint.save_tensors

    def save_then_die(tensors, path, metadata=None):
        if Path(path).parent.name == f"step-{step:07d}.tmp" and Path(path).name == "optimizer.safetensors":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, metadata)

    checkpoint.save_tensors = save_then_die


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-in-checkpoint", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from adala.train import TrainConfig, rank, train

    if args.kill_in_checkpoint is not None:
        kill_inside_checkpoint(args.kill_in_checkpoint)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=3e-3, warmup_steps=3, accum_steps=args.accum,
                      ckpt_every=args.ckpt_every, keep=args.keep, log_every=5, resume=args.resume,
                      device="cpu", progress=False, seed=7)
    objective = build(sleep=args.sleep)
    res = train(objective, SyntheticData(), cfg, args.out, stage="test")
    state = {k: v.contiguous() for k, v in objective.student.state_dict().items()}
    save_file(state, str(Path(args.out) / f"final-rank{rank()}.safetensors"))
    logged = [[h["step"], h["loss"], h["mae"]] for h in res.history]
    (Path(args.out) / f"history-rank{rank()}.json").write_text(json.dumps(logged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
