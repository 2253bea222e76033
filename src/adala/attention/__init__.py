"""Attention kinds behind one registry. Importing this package registers the built-in kinds."""

# registration side effects:
from . import agent, focused, hedgehog, linear, nystrom, performer, softmax, window_hybrid  # noqa: F401
from .base import KernelAttention
from .registry import available, build, get, register

__all__ = ["KernelAttention", "available", "build", "get", "register"]
