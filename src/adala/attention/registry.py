"""name -> attention class. Adding a kind = one small file + ``@register("name")``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnknownAttentionError

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        cls.kind = name
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        raise UnknownAttentionError(f"unknown attention kind {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, softmax_attn: nn.Module, **options: Any) -> nn.Module:
    """Build an attention of kind ``name`` from a teacher's softmax attention module."""
    return get(name)(softmax_attn, **options)
