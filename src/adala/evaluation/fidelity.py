"""How closely a student reproduces its teacher, on real images.

* per-layer attention error, teacher-forced: each student attention gets the teacher's attention input,
  ``||student_attn(teacher_in) - teacher_attn_out|| / ||teacher_attn_out||`` per image (what stage 1 trains);
* final-token agreement from the student's own forward: cosine per token (and relative error) to the
  teacher's ``forward_features`` output, averaged over tokens then images (what stage 2 trains); the CLS
  token's cosine on its own (what a classifier or retrieval reads);
* patch-structure agreement: for each patch, the overlap of its k nearest patches (cosine, same image) under
  teacher and student. Dense users (segmentation, matching, k-NN label transfer) read exactly this
  neighbourhood structure, and a student can keep a high mean cosine while scrambling it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import family_of
from ..models.recorder import TeacherRecorder
from ..models.resolve import check_pair
from ..models.surgery import attention_modules, backbone_of
from ..train.distributed import all_reduce_sum

STRUCTURE_K = 10
STRUCTURE_QUERIES = 512  # evenly spaced query patches per image: a 1344² image has 9216 patches


def knn_sets(patches: torch.Tensor, k: int, queries: torch.Tensor) -> torch.Tensor:
    """(N, C) patch features -> (Q, k) indices of each query patch's k nearest other patches (cosine)."""
    f = F.normalize(patches.float(), dim=-1)
    sim = f[queries] @ f.T
    sim[torch.arange(len(queries)), queries] = -float("inf")  # a patch is not its own neighbour
    return sim.topk(min(k, f.shape[0] - 1), dim=-1).indices


def structure_agreement(student_patches: torch.Tensor, teacher_patches: torch.Tensor, k: int = STRUCTURE_K,
                        max_queries: int = STRUCTURE_QUERIES) -> float:
    """Mean overlap |kNN_s(i) ∩ kNN_t(i)| / k over query patches of one image ((N, C) each): 1 = same
    neighbourhoods, about k/N for an unrelated student."""
    n = teacher_patches.shape[0]
    q = torch.linspace(0, n - 1, min(n, max_queries)).round().long().unique()
    a, b = knn_sets(teacher_patches, k, q), knn_sets(student_patches, k, q)
    hits = torch.zeros(len(q), n, dtype=torch.bool)
    hits.scatter_(1, a, True)
    return float(hits.gather(1, b).float().sum(1).mean() / a.shape[1])


class FidelityMeter:
    """Accumulates per-image sums; ``result()`` averages (after an optional all-reduce over ranks)."""

    def __init__(self, num_blocks: int, k: int = STRUCTURE_K) -> None:
        self.k = k
        self.attn = torch.zeros(num_blocks, dtype=torch.float64)
        # cos, rel, cls cosine, structure agreement, count
        self.sums = torch.zeros(5, dtype=torch.float64)

    @torch.no_grad()
    def update(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> None:
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
        rec.clear()
        s_tokens = family_of(s_vit).features(s_vit, x).float()
        self.add_tokens(s_tokens, t_tokens, family_of(t_vit).num_prefix_tokens(t_vit))

    def add_tokens(self, s_tokens: torch.Tensor, t_tokens: torch.Tensor, prefix: int) -> None:
        """Final tokens (B, T, C) of student and teacher; the first ``prefix`` are CLS/register tokens."""
        s_tokens, t_tokens = s_tokens.float().cpu(), t_tokens.float().cpu()
        cos = F.cosine_similarity(s_tokens, t_tokens, dim=-1)
        rel = (s_tokens - t_tokens).flatten(1).norm(dim=1) / t_tokens.flatten(1).norm(dim=1).clamp_min(1e-12)
        cls = cos[:, 0] if prefix else cos.mean(1)  # no CLS token: the mean token stands in
        struct = [structure_agreement(s[prefix:], t[prefix:], self.k) for s, t in zip(s_tokens, t_tokens)]
        self.sums += torch.tensor([cos.mean(1).sum(), rel.sum(), cls.sum(), sum(struct), len(s_tokens)],
                                  dtype=torch.float64)

    def all_reduce(self) -> None:
        self.attn, self.sums = all_reduce_sum(self.attn), all_reduce_sum(self.sums)

    def result(self) -> dict:
        n = max(float(self.sums[4]), 1.0)
        per_block = [float(v) / n for v in self.attn]
        cos, rel, cls, struct = (float(v) / n for v in self.sums[:4])
        return {
            "attn_rel_err": per_block,
            "attn_rel_err_mean": sum(per_block) / max(len(per_block), 1),
            "final_cosine": cos,
            "final_rel_err": rel,
            "cls_cosine": cls,
            f"structure_k{self.k}": struct,
            "num_images": int(self.sums[4]),
        }


@torch.no_grad()
def fidelity(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor],
             device: torch.device | str = "cpu") -> dict:
    """Fidelity of ``student`` to ``teacher`` over image batches (tensors or (image, target) pairs)."""
    check_pair(teacher, student)
    meter = FidelityMeter(len(attention_modules(student)))
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        meter.update(student, teacher, x.to(device))
    meter.all_reduce()
    return meter.result()
