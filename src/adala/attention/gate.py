"""A low-rank output gate for linear kinds, exactly the identity at initialisation (IronViT's remedy).

Linear attention's output is a smooth average over all tokens; a per-token, per-channel gate computed from
the block's own input lets each token scale down the channels where that average is wrong, which a rank-≤d
state cannot. The gate is ``2·sigmoid(up(down(x)))`` with ``up`` zero-initialised, so it starts at exactly 1
(the student equals the plain kind) and learns like a LoRA branch. Rank R costs 2·R·(C + H·D) FLOPs per
token: at R = C/8 about 2 % of a ViT block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def check_rank(rank: object) -> int:
    """``out_gate`` is 0 (off) or a positive int rank: a one-line error for anything else (true, 2.5, -1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"out_gate must be 0 (off) or a positive rank, got {rank!r}")
    return rank


class OutputGate(nn.Module):
    def __init__(self, dim: int, attn_dim: int, rank: int) -> None:
        super().__init__()
        if check_rank(rank) == 0:
            raise ConfigError("an OutputGate needs a positive rank")
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, attn_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.up(self.down(x)))
