"""Attention kinds behind one registry. Importing this package registers the built-in kinds."""

from . import linear, softmax  # noqa: F401  (registration side effects)
from .base import KernelAttention
from .registry import available, build, get, register

__all__ = ["KernelAttention", "available", "build", "get", "register"]
