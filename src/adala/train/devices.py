"""Where a run computes and whether it fits: the device for ``device="auto"`` and a refusal, before any data
is decoded, of an image size whose activations cannot fit in that device's memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.resolve import patch_size
from ..models.surgery import backbone_of


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
