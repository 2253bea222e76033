"""The three ViT-AdaLA stages after ``linearize``: attention alignment, feature alignment, fine-tuning."""

from ..models.heads import ClassificationModel, SegmentationModel
from .align_attention import align_attention
from .align_features import align_features
from .finetune import finetune
from .result import StageResult


def __getattr__(name: str):
    # ``adala.stages.evaluate`` (before 0.2): evaluation is no stage; it lives in ``adala.evaluation``
    if name == "evaluate":
        # lazy: deprecated alias, resolved on use
        import warnings

        # lazy: deprecated alias, resolved on use
        from ..evaluation import evaluate

        warnings.warn("adala.stages.evaluate is deprecated; use adala.evaluate or adala.evaluation.evaluate",
                      DeprecationWarning, stacklevel=2)
        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ClassificationModel", "SegmentationModel", "StageResult", "align_attention", "align_features",
    "finetune",
]
