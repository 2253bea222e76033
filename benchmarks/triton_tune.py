"""Sweep the Triton linear-attention kernels' launch settings on this GPU (DINOv2-L shapes, bf16).

For each token count: time ``linear_attention_triton`` (state + partial sum + output) with
``triton.testing.do_bench`` over tile size, warps, pipeline stages and programs per head, and print
the defaults' time next to the best. Used to choose the defaults in ``adala.attention.triton_kernels``.

  python benchmarks/triton_tune.py [--tokens 325,1297,5330,21317] [--heads 16] [--head-dim 64] [--out tune.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="325,1297,5330,21317")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_tune: no CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from adala.attention import triton_kernels as tk

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    h, d = args.heads, args.head_dim
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        qkv = torch.randn(1, n, 3 * h * d, device="cuda", dtype=torch.bfloat16)
        default = do_bench(lambda qkv=qkv: tk.linear_attention_triton(qkv, h, d)) * 1e3
        best = (default, "default")
        for block, warps, stages, per_sm in itertools.product((32, 64, 128), (4, 8), (2, 3), (1, 2, 4)):
            splits = max(1, -(-per_sm * sms // h))
            try:
                kw = dict(splits=splits, block=block, num_warps=warps, num_stages=stages)
                us = do_bench(lambda qkv=qkv, kw=kw: tk.linear_attention_triton(qkv, h, d, **kw)) * 1e3
            except Exception as e:  # noqa: BLE001 - out of shared memory/registers: not a candidate
                print(f"  N={n} block={block} warps={warps} stages={stages}: {type(e).__name__}", file=sys.stderr)
                continue
            cfg = f"block={block} warps={warps} stages={stages} programs/SM={per_sm}"
            rows.append({"tokens": n, "block": block, "num_warps": warps, "num_stages": stages,
                         "programs_per_sm": per_sm, "us": us})
            best = min(best, (us, cfg))
        rows.append({"tokens": n, "default_us": default, "best_us": best[0], "best": best[1]})
        print(f"N={n:>6}: default {default:7.1f} us, best {best[0]:7.1f} us ({best[1]})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
