"""Typed errors. The CLI turns any AdalaError into one line on stderr (exit 2 for user mistakes,
exit 1 for internal failures); the API lets callers catch them by type."""

from __future__ import annotations


class AdalaError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 2


class UnknownAttentionError(AdalaError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownTeacherError(AdalaError, ValueError):
    pass


class UnsupportedModelError(AdalaError, TypeError):
    pass


class CheckpointError(AdalaError, OSError):
    """A model directory or checkpoint is missing, incomplete, corrupt, or not safetensors."""


class CacheError(AdalaError, OSError):
    pass


class ConfigError(AdalaError, ValueError):
    pass


class DataError(AdalaError, ValueError):
    pass


class NonFiniteError(AdalaError, FloatingPointError):
    """Training produced a NaN/Inf; the last good checkpoint is left untouched."""

    exit_code = 1


class OfflineError(AdalaError, ConnectionError):
    pass


class ExportError(AdalaError, RuntimeError):
    """A model cannot be exported in the requested form, or its exported graph disagrees with PyTorch."""


class ExportCheckError(ExportError):
    """The exported graph runs but disagrees with PyTorch: an exporter/adala bug, not a user mistake."""

    exit_code = 1
