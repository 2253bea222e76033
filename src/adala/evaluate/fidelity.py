"""How closely a student reproduces its teacher, on real images.

* per-layer attention error, teacher-forced: each student attention gets the teacher's attention input,
  ``||student_attn(teacher_in) - teacher_attn_out|| / ||teacher_attn_out||`` per image (what stage 1 trains);
* final-token agreement from the student's own forward: cosine per token (and relative error) to the
  teacher's ``forward_features`` output, averaged over tokens then images (what stage 2 trains).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import family_of
from ..models.surgery import attention_modules, backbone_of


class FidelityMeter:
    """Accumulates per-image sums; ``result()`` averages (after an optional all-reduce over ranks)."""

    def __init__(self, num_blocks: int) -> None:
        self.attn = torch.zeros(num_blocks, dtype=torch.float64)
        self.cos = torch.zeros((), dtype=torch.float64)
        self.rel = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
        from ..stages.common import TeacherRecorder

        s_vit, t_vit = backbone_of(student), backbone_of(teacher)
        rec = TeacherRecorder(t_vit)
        try:
            t_tokens = family_of(t_vit).features(t_vit, x).float()
        finally:
            rec.remove()
        b = x.shape[0]
        for i, attn in enumerate(attention_modules(s_vit)):
            out = attn(rec.attn_in[i], **rec.attn_kwargs[i]).float()
            target = rec.attn_out[i].float()
            # per image: SAM's windowed blocks see (B·windows, ws, ws, C), image-major
            err = (out - target).reshape(b, -1).norm(dim=1) / target.reshape(b, -1).norm(dim=1).clamp_min(1e-12)
            self.attn[i] += err.double().sum().cpu()
        s_tokens = family_of(s_vit).features(s_vit, x).float()
        self.cos += F.cosine_similarity(s_tokens, t_tokens, dim=-1).mean(1).double().sum().cpu()
        rel = (s_tokens - t_tokens).flatten(1).norm(dim=1) / t_tokens.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.rel += rel.double().sum().cpu()
        self.count += x.shape[0]

    def all_reduce(self) -> None:
        from ..train.distributed import all_reduce_sum

        self.attn, self.cos = all_reduce_sum(self.attn), all_reduce_sum(self.cos)
        self.rel, self.count = all_reduce_sum(self.rel), all_reduce_sum(self.count)

    def result(self) -> dict:
        n = max(float(self.count), 1.0)
        per_block = [float(v) / n for v in self.attn]
        return {
            "attn_rel_err": per_block,
            "attn_rel_err_mean": sum(per_block) / max(len(per_block), 1),
            "final_cosine": float(self.cos) / n,
            "final_rel_err": float(self.rel) / n,
            "num_images": int(self.count),
        }


@torch.no_grad()
def fidelity(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor],
             device: torch.device | str = "cpu") -> dict:
    """Fidelity of ``student`` to ``teacher`` over image batches (tensors or (image, target) pairs)."""
    from ..stages.common import check_pair

    check_pair(teacher, student)
    meter = FidelityMeter(len(attention_modules(student)))
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        meter.update(student, teacher, x.to(device))
    meter.all_reduce()
    return meter.result()
