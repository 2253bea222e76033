"""The one interface every attention kind implements.

A kind is built *from* a teacher's softmax attention module and takes over its submodules
(qkv, q_norm, k_norm, norm, proj) by reference, so state-dict keys and pretrained tensors stay
exactly the teacher's; only a kind's own extra parameters get new names. Subclasses implement
``mix(q, k, v)`` on (B, H, N, D) tensors; everything around it is shared.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError


def upcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the dtype the exact-softmax kinds accumulate in: float64 stays, everything else becomes fp32
    (under autocast too, which the caller switches off), since their scores are exponentiated."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    return q.to(acc), k.to(acc), v.to(acc)


def is_linear(attn: nn.Module) -> bool:
    """Whether ``attn`` is one of the linear kinds (anything but exact softmax): the blocks stage 1 trains, the
    benchmarks count as linear and a hybrid can switch back. A module without a ``kind`` is the teacher's
    own softmax attention."""
    return getattr(attn, "kind", "softmax") != "softmax"


# the submodules a kind takes over from the teacher's attention: their tensors are pretrained
TEACHER_PARTS = ("qkv", "q_norm", "k_norm", "norm", "gate", "proj")


def option_names(cls: type) -> set[str]:
    """Every option a kind accepts: the keyword parameters of each ``__init__`` along its class chain (a kind
    forwards what it does not name itself to its parent, so the union is what the chain reads)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module:
            continue
        names.update(p.name for p in list(inspect.signature(init).parameters.values())[2:]
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names


def check_option_names(cls: type, options: dict[str, Any], name: str | None = None) -> None:
    """Unknown options fail in one line. Why: a kind's ``**options`` would otherwise swallow a typo
    (``kmeans_point: 0``) and train a different student than the recipe says, with nothing to show for it.
    ``name``: the kind the message names (a family's own class, Eva's or SAM's, serves several kinds)."""
    unknown = sorted(set(options) - option_names(cls))
    if unknown:
        name = name or cls.kind
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for attention "
                          f"{name}; it takes: {', '.join(sorted(option_names(cls))) or 'no options'}")


class KernelAttention(nn.Module):
    """Shared projection plumbing; ``mix`` is the only thing a kind has to write."""

    kind: str = "?"

    def __init__(self, attn: nn.Module, **options: Any) -> None:
        super().__init__()
        check_option_names(type(self), options)
        if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise UnsupportedModelError(
                f"cannot linearize {type(attn).__name__}: expected a timm-style attention with fused qkv"
            )
        self.num_heads = attn.num_heads
        self.head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * attn.num_heads))
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = getattr(attn, "scale", self.head_dim**-0.5)
        self.qkv = attn.qkv
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.out_gate: nn.Module | None = None  # a linear kind's own learnable output gate (``out_gate=R``)
        self.proj = attn.proj
        self.proj_drop = getattr(attn, "proj_drop", nn.Identity())
        self.options = dict(options)
        self.num_prefix_tokens = 0  # set by surgery; kinds with a patch grid need it

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def added_parameters(self) -> list[nn.Parameter]:
        """The kind's own parameters (a ``dwc`` conv, temperatures, an output gate, feature maps): everything but
        the teacher's submodules. They start at or near identity (often exactly zero), so under AdamW, which moves
        a weight by at most about lr per step, a short alignment leaves them where they started unless they get a
        larger learning rate (``TrainConfig.added_lr_scale``)."""
        taken = {id(p) for part in TEACHER_PARTS if (m := getattr(self, part, None)) is not None
                 for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in taken]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError(f"{self.kind} attention is non-causal and takes no attn_mask")
        b, n, _ = x.shape
        q, k, v = self.qkv_heads(x)
        out = self.mix(q, k, v)
        out = self.gated(self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim)), x)
        return self.proj_drop(self.proj(out))

    def gated(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H·D) mixed output times the teacher's own gate (if it has one) and the kind's output gate."""
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        if self.out_gate is not None:
            out = out * self.out_gate(x)
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.num_heads}, head_dim={self.head_dim}, options={self.options}"
