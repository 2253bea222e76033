"""Model surgery, teachers and checkpoint I/O."""

from .config import get_config
from .io import load_model, save_model
from .surgery import attention_modules, backbone_of, block_kinds, linearize, linearize_blocks
from .teachers import load_teacher, teacher_forms

__all__ = [
    "attention_modules", "backbone_of", "block_kinds", "get_config", "linearize", "linearize_blocks",
    "load_model", "load_teacher", "save_model", "teacher_forms",
]
