"""The teacher pass both alignment stages and the fidelity metrics learn from: one forward, every block recorded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .families import family_of
from .surgery import attention_modules, backbone_of


class TeacherRecorder:
    """Forward hooks on a teacher's attention modules: one teacher pass yields, for every block, the
    attention's input (``norm1(x)``, window-partitioned for SAM's windowed blocks), its keyword arguments
    (Eva's ``rope``: replayed to the student unchanged), its output, and optionally the block's own input."""

    def __init__(self, teacher: nn.Module, block_inputs: bool = False) -> None:
        self.handles = []
        vit = backbone_of(teacher)
        mods = attention_modules(vit)
        n = len(mods)
        self.attn_in: list[torch.Tensor | None] = [None] * n
        self.attn_kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
        self.attn_out: list[torch.Tensor | None] = [None] * n
        self.block_in: list[torch.Tensor | None] = [None] * n
        blocks = family_of(vit).blocks(vit)
        for i, mod in enumerate(mods):
            self.handles.append(mod.register_forward_hook(self._attn_hook(i), with_kwargs=True))
            if block_inputs:
                self.handles.append(blocks[i].register_forward_pre_hook(self._block_hook(i)))

    def _attn_hook(self, i: int):
        def hook(_mod, args, kwargs, output):
            self.attn_in[i] = args[0].detach()
            self.attn_kwargs[i] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            self.attn_out[i] = output.detach()

        return hook

    def _block_hook(self, i: int):
        def hook(_mod, args):
            self.block_in[i] = args[0].detach()

        return hook

    def clear(self) -> None:
        n = len(self.attn_in)
        self.attn_in, self.attn_out, self.block_in = [None] * n, [None] * n, [None] * n
        self.attn_kwargs = [{} for _ in range(n)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
