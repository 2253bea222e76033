"""What each linear-attention change buys: the same model with the kernel rolled back step by step.

Variants (cumulative), all numerically equal to float tolerance:

  naive    the original module: F.elu(x)+1 out of place on q and k, a ones column concatenated to v,
           4-D matmuls (which copy the permuted q/k/v views), division, transpose+reshape copy
  ksum     Σφk by a reduction instead of the ones-column concat (the autograd path today)
  layout65 no-grad: 3-D bmm on the strided q/k/v views (no copies), φq·[φkᵀv | Σφk] as one (D+1)-column
           matmul, division written straight into (N, H, D) (no transpose copy afterwards)
  layout   the same with a D-column numerator matmul and one gemv per head for the normaliser
  inplace  fused: φ in place once over the packed q|k slab of a fresh qkv projection
  workspace + the qkv projection written into a reused per-thread workspace
  fused    + the output projection folded into the state: (φq/den)(KᵀV Wpᵀ) replaces the per-token
           φq·KᵀV product and the division pass (today's inference path)

Timed interleaved with the teacher (softmax via SDPA), median of repeats. Usage:
  python benchmarks/kernel_ablation.py --resolutions 224,672,1344 --repeats 5 [--threads 2] [--out DIR]
  python benchmarks/kernel_ablation.py --threads 1 --clock cpu   # on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

import adala
from adala.attention.base import KernelAttention
from adala.attention.ops import elu_plus_one, fused_linear_attention, linear_attention, packed_projection
from adala.benchmark.flops import block_flops, model_flops
from adala.benchmark.measure import interleaved

VARIANTS = ("naive", "ksum", "layout65", "layout", "inplace", "workspace", "fused")


def naive_linear_attention(phi_q, phi_k, v, eps=1e-6):
    """The kernel as first written (ones column on v)."""
    out_dtype = v.dtype
    with torch.autocast(device_type=v.device.type, enabled=False):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        phi_q, phi_k, v = phi_q.to(acc), phi_k.to(acc), v.to(acc)
        ones = torch.ones(*v.shape[:-1], 1, dtype=acc, device=v.device)
        kv = phi_k.transpose(-2, -1) @ torch.cat([v, ones], dim=-1)
        qkv = phi_q @ kv
        out = qkv[..., :-1] / (qkv[..., -1:] + eps)
    return out.to(out_dtype)


def ksum_linear_attention(phi_q, phi_k, v, eps=1e-6):
    """Σφk as a reduction, stacked next to φkᵀv; 4-D matmuls and a contiguous (B, H, N, D) result."""
    with torch.enable_grad():  # force the autograd-shaped branch of linear_attention
        out = linear_attention(phi_q.requires_grad_(), phi_k, v, eps)
    return out.detach()


def layout65_linear_attention(phi_q, phi_k, v, eps=1e-6):
    """No-grad layout path with the normaliser as a 65th matmul column."""
    b, h, n, dv = v.shape[0], v.shape[1], phi_q.shape[2], v.shape[-1]
    mem = torch.empty(b, n, h, dv)
    nd = torch.empty(h, n, dv + 1)
    for i in range(b):
        kvs = torch.cat([torch.bmm(phi_k[i].transpose(1, 2), v[i]), phi_k[i].sum(1).unsqueeze(-1)], -1)
        torch.bmm(phi_q[i], kvs, out=nd)
        torch.div(nd[..., :dv], nd[..., dv:] + eps, out=mem[i].transpose(0, 1))
    return mem.transpose(1, 2)


def _inplace_forward(self, x, attn_mask=None, **_):
    out = fused_linear_attention(self.qkv(x), self.num_heads, self.head_dim, self.feature_map_name, self.eps)
    return self.proj(out)


def _workspace_forward(self, x, attn_mask=None, **_):
    qkv = packed_projection(x, self.qkv)
    out = fused_linear_attention(qkv, self.num_heads, self.head_dim, self.feature_map_name, self.eps)
    return self.proj(out)


def _mix_forward(mix):
    def forward(self, x, attn_mask=None, **_):
        return KernelAttention.forward(self, x)

    def mix_(self, q, k, v):
        return mix(elu_plus_one(q), elu_plus_one(k), v, self.eps)

    return forward, mix_


def variant(student: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of ``student`` whose linear-elu blocks run the kernel as of step ``name``."""
    import copy

    m = copy.deepcopy(student)
    if name == "fused":
        return m
    if name in ("inplace", "workspace"):
        fwd = _inplace_forward if name == "inplace" else _workspace_forward
        for blk in m.blocks:
            blk.attn.forward = types.MethodType(fwd, blk.attn)
        return m
    kernel = {"naive": naive_linear_attention, "ksum": ksum_linear_attention, "layout65": layout65_linear_attention,
              "layout": linear_attention}[name]
    forward, mix = _mix_forward(kernel)
    for blk in m.blocks:
        blk.attn.forward = types.MethodType(forward, blk.attn)
        blk.attn.mix = types.MethodType(mix, blk.attn)
    return m


def check_equal(models: dict[str, torch.nn.Module], res: int = 112) -> dict[str, float]:
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = models["fused"].forward_features(x)
        return {n: ((m.forward_features(x) - ref).norm() / ref.norm()).item() for n, m in models.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", default="224,672,1344")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--level", choices=["model", "attention"], default="model",
                    help="attention = time block 0's attention module alone on its real input (ms per layer)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = process CPU time (use with --threads 1 on a busy machine)")
    ap.add_argument("--out", default=None, help="directory for ablation.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = adala.load_teacher()
    student = adala.linearize(teacher, "linear-elu")
    names = [v for v in args.variants.split(",") if v]
    models = {n: variant(student, n) for n in names}
    diffs = check_equal({**models, "fused": models.get("fused", student)})
    print("max relative difference to the fused path: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    rows = []
    for res in [int(r) for r in args.resolutions.split(",")]:
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))

        x_attn = None
        if args.level == "attention":
            with torch.inference_mode():  # block 0's real attention input at this resolution
                h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
                x_attn = teacher.blocks[0].norm1(h)

        def call(m, x=x, x_attn=x_attn):
            if args.level == "attention":
                attn = m.blocks[0].attn

                def fn():
                    with torch.inference_mode():
                        attn(x_attn)
            else:
                def fn():
                    with torch.inference_mode():
                        m.forward_features(x)
            return fn

        fns = [call(teacher)] + [call(m) for m in models.values()]
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = interleaved(fns, torch.device("cpu"), args.repeats, warmup=1, clock=clock)
        t_med = statistics.median(times[0])
        if args.level == "attention":
            n = x_attn.shape[1]
            tb, sb = (block_flops(m.blocks[0], n) for m in (teacher, student))
            bound = (tb["qkv"] + tb["attention"] + tb["proj"]) / (sb["qkv"] + sb["attention"] + sb["proj"])
        else:
            bound = model_flops(teacher, res)["total"] / model_flops(student, res)["total"]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        line = f"{res:>5}px teacher {t_med * 1e3:8.1f} ms | bound {bound:.2f}x"
        row = {"resolution": res, "teacher_ms": t_med * 1e3, "flop_bound": bound, "load_average": load,
               "clock": args.clock, "threads": args.threads}
        for n, t in zip(models, times[1:]):
            med = statistics.median(t)
            row[n] = {"ms": med * 1e3, "speedup": t_med / med, "fraction_of_bound": t_med / med / bound}
            row[n]["min_ms"] = min(t) * 1e3
            line += f" | {n} {med * 1e3:8.1f} ms {t_med / med:.2f}x ({100 * t_med / med / bound:.0f}%)"
        print(line + (f" | load {load:.1f}" if load is not None else ""), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ablation.json").write_text(json.dumps({"rows": rows, "diffs": diffs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
