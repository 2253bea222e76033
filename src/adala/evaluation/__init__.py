"""Scores of a model: top-1 / mIoU on labelled data, fidelity to its teacher, patch correspondence."""

from .fidelity import FidelityMeter, fidelity
from .metrics import ConfusionMatrix
from .run import TASKS, evaluate

__all__ = ["TASKS", "ConfusionMatrix", "FidelityMeter", "evaluate", "fidelity"]
