"""The one training loop under every stage.

A stage hands over an ``objective`` (``forward(batch) -> (loss, metrics)``, with ``.student``), a dataset
and a :class:`TrainConfig`; the loop owns the device, AMP, AdamW + warmup/cosine, accumulation, clipping,
DDP, deterministic data order, checkpoints and exact resume, logs and non-finite detection, so that every
stage gets them identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checks import check_positive
from ..data.base import set_skip_sink
from ..errors import CheckpointError, ConfigError, NonFiniteError
from . import distributed as dist
from .checkpoint import (
    check_compatible,
    complete_checkpoints,
    find_latest,
    quarantine,
    remove_stale,
    write_checkpoint,
)
from .logs import TensorBoard, log_event, read_log
from .sampler import BatchStream
from .schedule import build_optimizer, build_scheduler, trainable_parameters
from .state import RunState, seed_all

AMP_MODES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
DEVICES = ("auto", "cpu", "cuda")

log = logging.getLogger("adala.train")


@dataclass
class TrainConfig:
    steps: int                      # optimizer steps
    batch_size: int = 8             # per process, per micro-step
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0           # linear warmup then cosine decay to min_lr_ratio*lr
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accum_steps: int = 1
    amp: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 0             # 0 = only at the end
    keep: int = 2                   # checkpoints kept
    resume: bool = False
    device: str = "auto"            # auto | cpu | cuda
    progress: bool = True           # tqdm bar on rank 0
    ema: float = 0.0                # EMA decay of the trained weights (0 = off); the result is the average
    added_lr_scale: float = 1.0     # lr multiplier of the parameters the linearization added (dwc, temperatures)

    def validate(self) -> None:
        positive = ("steps", "batch_size", "accum_steps", "log_every", "keep")
        bad = [f"{f}={getattr(self, f)}" for f in positive if int(getattr(self, f)) < 1]
        bad += [f"{f}={getattr(self, f)}" for f in ("warmup_steps", "ckpt_every", "num_workers", "lr",
                                                    "weight_decay") if getattr(self, f) < 0]
        if not self.added_lr_scale > 0:
            bad.append(f"added_lr_scale={self.added_lr_scale} (a positive multiplier of lr)")
        if not 0.0 <= self.ema < 1.0:
            bad.append(f"ema={self.ema} (a decay in [0, 1); 0 = off)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            bad.append(f"min_lr_ratio={self.min_lr_ratio} (must be in [0, 1])")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            bad.append(f"grad_clip={self.grad_clip} (positive, or 0/None for no clipping)")
        if self.amp not in AMP_MODES:
            bad.append(f"amp={self.amp!r} (one of {', '.join(AMP_MODES)})")
        if self.device not in DEVICES:
            bad.append(f"device={self.device!r} (auto, cpu or cuda)")
        if bad:
            raise ConfigError("invalid training config: " + "; ".join(bad))


def train_config(*, steps: int, batch_size: int, lr: float, train_kwargs: dict[str, Any]):
    """A TrainConfig; unknown keyword arguments are named in a ConfigError rather than ignored."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "batch_size", "lr"}
    unknown = sorted(set(train_kwargs) - names)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    check_positive(steps, "steps")
    check_positive(batch_size, "batch_size")
    check_positive(lr, "lr", float)
    return TrainConfig(steps=steps, batch_size=batch_size, lr=float(lr), **train_kwargs)


@dataclass
class TrainResult:
    steps: int
    history: list[dict]             # one dict per logged step: {"step", "loss", "lr", **metrics}
    final: dict                     # mean metrics over the last log window, incl "loss"
    wall_time_s: float
    out_dir: Path
    already_finished: bool = False  # resumed a finished run: nothing trained, nothing written


def to_device(batch, device: torch.device, non_blocking: bool = False):
    """Tensors inside tuples/lists/dicts moved to ``device``; anything else passed through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        moved = [to_device(b, device, non_blocking) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def _select_device(cfg: TrainConfig) -> torch.device:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available")
    dist.init_from_env("nccl" if use_cuda else "gloo")
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", dist.local_rank())
    torch.cuda.set_device(device)
    return device


def _train_mode(objective: nn.Module) -> None:
    """Train mode, except for parts with parameters none of which train (the frozen teacher, a linear probe's
    backbone): those stay in eval mode, so their dropout/drop-path never perturbs the targets or features."""
    objective.train()
    for m in objective.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def _first_nonfinite_grad(named: list[tuple[str, nn.Parameter]]) -> str:
    for name, p in named:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name
    return "an unknown parameter"


def train(objective: nn.Module, dataset, cfg: TrainConfig, out_dir: str | Path, stage: str,
          collate_fn=None, finished: bool = False) -> TrainResult:
    """Train ``objective``'s trainable parameters (those with requires_grad) for ``cfg.steps`` updates.

    ``objective.student`` is what checkpoints hold (plus any trainable tensor outside it; a frozen teacher
    never). Optional attributes: ``objective.run_config`` (JSON-able stage options that must match on resume)
    and ``objective.ddp_find_unused_parameters``. Modules with parameters none of which train are kept in
    eval mode. Raises ConfigError/DataError before anything is written, CheckpointError on an incompatible
    resume or a failed write, NonFiniteError on a NaN/Inf loss or gradient.

    ``finished``: the caller's outputs of this run already exist (a finished stage). A resume whose newest
    checkpoint is compatible and already at ``cfg.steps`` then returns at once with ``already_finished`` and
    the student restored, writing nothing (not even a log line), so ``--resume`` on a finished run is a no-op.
    """
    t_start = time.perf_counter()
    cfg.validate()
    student = getattr(objective, "student", None)
    if not isinstance(student, nn.Module):
        raise ConfigError(f"{stage}: the objective has no .student module to checkpoint")
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    device = _select_device(cfg)
    main, world = dist.is_main(), dist.world_size()
    objective.to(device)
    named = trainable_parameters(objective)
    if not named:
        raise ConfigError(f"{stage}: nothing to train (no parameter of the objective requires grad)")
    amp_dtype = AMP_MODES[cfg.amp] or (torch.bfloat16 if cfg.amp == "auto" and device.type == "cuda" else None)
    amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    optimizer = build_optimizer(objective, named, cfg.lr, cfg.weight_decay, cfg.added_lr_scale)
    run = RunState(
        objective, student, optimizer, build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio),
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        BatchStream(dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=dist.rank(), world_size=world,
                    num_workers=cfg.num_workers, collate_fn=collate_fn, pin_memory=device.type == "cuda"),
        device, ema=cfg.ema,
    )
    record = run.record(cfg, stage, dataset)

    # Resume (or refuse to clobber) before anything is written.
    loaded, skipped = find_latest(root) if cfg.resume else (None, [])
    if loaded is not None:
        check_compatible(loaded.state, record, loaded.path)
    elif not cfg.resume and complete_checkpoints(root):
        raise CheckpointError(f"{root} already holds checkpoints ({complete_checkpoints(root)[-1][1].name}); "
                              "continue that run with --resume (resume=True in Python), or use another --out")
    if loaded is not None and finished and int(loaded.state["step"]) >= cfg.steps:
        start = run.restore(loaded)
        run.use_ema()
        history = [{k: v for k, v in r.items() if k != "time"} for r in read_log(out_dir)
                   if "event" not in r and r.get("step", math.inf) <= start]
        return TrainResult(steps=start, history=history, final={}, wall_time_s=time.perf_counter() - t_start,
                           out_dir=out_dir, already_finished=True)
    dist.barrier()
    if main:
        quarantine(skipped)
        remove_stale(root)
        for p in skipped:
            log_event(out_dir, {"event": "corrupt_checkpoint", "path": p, "renamed_to": p.name + ".corrupt"})
    sink = _open_skip_sink(dataset, out_dir)
    history: list[dict] = []
    start = 0
    if loaded is not None:
        start = run.restore(loaded)
        by_step = {r["step"]: {k: v for k, v in r.items() if k != "time"} for r in read_log(out_dir)
                   if "event" not in r and r.get("step", math.inf) <= start}
        history = [by_step[s] for s in sorted(by_step)]
        log_event(out_dir, {"event": "resume", "from_step": start, "checkpoint": loaded.path})
    else:
        seed_all(cfg.seed + dist.rank())
        log_event(out_dir, {"event": "start", "stage": stage, "steps": cfg.steps, "world_size": world,
                            "device": str(device), "amp": amp_name})
    bad = list(getattr(dataset, "skipped", None) or [])
    if main and bad:  # unreadable images never stop a run: they are counted and listed
        log_event(out_dir, {"event": "skipped_images", "count": len(bad),
                            "files": [{"path": str(p), "reason": str(r)} for p, r in bad]})
        masks = sum("single-channel label map" in str(r) for _, r in bad)
        what = (f"{len(bad)} unusable file(s) ({masks} with masks that are not single-channel label maps)"
                if masks else f"{len(bad)} unreadable image(s)")
        log.warning("%s: skipped %s, listed in %s/log.jsonl", stage, what, out_dir)
    last_ckpt = loaded.path.name if loaded is not None else None

    model: nn.Module = objective
    if world > 1:
        model = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(getattr(objective, "ddp_find_unused_parameters", False)),
        )
    _train_mode(objective)
    params = [p for _, p in named]
    tb = TensorBoard(out_dir, purge_step=start + 1 if start else None) if main else None
    bar = tqdm(total=cfg.steps, initial=start, desc=stage, dynamic_ncols=True,
               disable=True if not (main and cfg.progress) else None)
    window, step = run.window, start
    images_per_step = cfg.batch_size * cfg.accum_steps * world

    def fail(what: str) -> NonFiniteError:
        msg = (f"{stage}: non-finite {what} at step {step + 1}; stopped without saving it (last good checkpoint: "
               f"{root / last_ckpt if last_ckpt else 'none'}); try a lower lr, grad_clip, or amp='fp32'")
        log_event(out_dir, {"event": "non_finite", "step": step + 1, "what": what})
        return NonFiniteError(msg)

    try:
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            stats = torch.zeros(2, device=device, dtype=torch.float64)  # [sum loss/accum, non-finite count]
            for i in range(cfg.accum_steps):
                batch = to_device(next(run.stream), device, non_blocking=device.type == "cuda")
                sync = model.no_sync() if world > 1 and i < cfg.accum_steps - 1 else nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, metrics = model(batch)
                    detached = loss.detach().double()
                    stats += torch.stack([detached / cfg.accum_steps, (~torch.isfinite(detached)).double()])
                    window.add_metrics(metrics)
                    run.scaler.scale(loss / cfg.accum_steps).backward()
            stats = dist.all_reduce_sum(stats).tolist()
            if stats[1] > 0:
                raise fail("loss")
            if run.scaler.is_enabled():
                run.scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
            if not math.isfinite(grad_norm) and not run.scaler.is_enabled():
                raise fail(f"gradient of {_first_nonfinite_grad(named)}")
            run.scaler.step(optimizer)  # with fp16, skips the update when grads overflowed
            run.scaler.update()
            run.update_ema(step + 1)
            lr = run.scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" after a skipped step
                warnings.simplefilter("ignore", UserWarning)
                run.scheduler.step()
            step += 1
            window.add_step(stats[0] / world, grad_norm)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                rec = {"step": step, "lr": lr, **window.summary(images_per_step)}
                history.append(rec)
                log_event(out_dir, rec)
                if tb is not None:
                    tb.scalars(rec, step)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{lr:.3g}")
                window.reset()
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                _save(run, root, step, record, cfg.keep, main)
                last_ckpt = f"step-{step:07d}"
                log_event(out_dir, {"event": "checkpoint", "step": step})
        dist.barrier()  # every rank's late skips are in the sinks before rank 0 lists them
        run.use_ema()  # the stage's result is the averaged model, as the last checkpoint's student already is
    finally:
        bar.close()
        if tb is not None:
            tb.close()
        if sink is not None:
            set_skip_sink(dataset, None)
            if main:
                _report_late_skips(out_dir, stage)
    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "lr", "imgs_per_s")}
    return TrainResult(steps=step, history=history, final=final, wall_time_s=time.perf_counter() - t_start,
                       out_dir=out_dir)


_SINK = ".skipped.rank{}.jsonl"


def _open_skip_sink(dataset, out_dir: Path) -> Path | None:
    """Have the dataset note samples it skips while being read (in any worker) in a per-rank sink file."""
    sink = out_dir / _SINK.format(dist.rank())
    if not set_skip_sink(dataset, None):
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    sink.unlink(missing_ok=True)  # left by a run killed before it could list them
    set_skip_sink(dataset, str(sink))
    return sink


def _report_late_skips(out_dir: Path, stage: str) -> None:
    """List the samples skipped during training (every rank's sink) in log.jsonl, one line on stderr."""
    files: list[dict] = []
    for path in sorted(out_dir.glob(_SINK.format("*"))):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                files.append(json.loads(line))
            except ValueError:
                continue
        path.unlink(missing_ok=True)
    if files:
        log_event(out_dir, {"event": "skipped_images", "count": len(files), "during": "training", "files": files})
        log.warning("%s: skipped %d unreadable sample(s) while reading the data, listed in %s/log.jsonl", stage,
                    len(files), out_dir)


def _save(run: RunState, root: Path, step: int, record: dict, keep: int, main: bool) -> None:
    """Rank 0 writes; every rank learns whether that worked, so all stop together on a write error."""
    tensors, jsons = run.snapshot(step, record)
    error: CheckpointError | None = None
    if main:
        try:
            write_checkpoint(root, step, tensors, jsons, keep)
        except CheckpointError as e:
            error = e
    if dist.broadcast_int(int(error is not None)):
        raise error or CheckpointError(f"rank 0 could not write checkpoint step-{step:07d} in {root}")
