"""Process-group helpers that also work in a plain single process.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; :func:`init_from_env` joins that group
(gloo on CPU, nccl on CUDA). Without them every helper degrades to the single-process answer, so the same
stage code runs unchanged in 1 CPU process, 2 CPU processes or N GPUs.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1; returns whether we are distributed.

    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. On CUDA the current device is
    set from LOCAL_RANK first, so each process owns one GPU.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """nccl only moves CUDA tensors; gloo only CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor on the input's device); the input itself when not distributed."""
    if not is_distributed():
        return tensor
    t = tensor.detach().to(_comm_device()).clone()
    if not t.is_floating_point():
        t = t.double()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    t = tensor.detach().to(_comm_device()).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, on CPU, in rank order."""
    if not is_distributed():
        return [tensor.detach().cpu()]
    t = tensor.detach().to(_comm_device()).contiguous()
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def broadcast_int(value: int, src: int = 0) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=src)
    return int(t.item())
