"""The three ViT-AdaLA stages after ``linearize``: attention alignment, feature alignment, fine-tuning.

Importing this package registers the task heads (``classification``, ``segmentation``) that
``adala.load_model`` needs to rebuild fine-tuned models.
"""

from ..evaluation import evaluate
from . import heads  # noqa: F401  (registers TASK_BUILDERS)
from .attention import align_attention
from .common import StageResult
from .features import align_features
from .finetune import finetune
from .heads import ClassificationModel, SegmentationModel

__all__ = [
    "ClassificationModel", "SegmentationModel", "StageResult", "align_attention", "align_features",
    "evaluate", "finetune",
]
