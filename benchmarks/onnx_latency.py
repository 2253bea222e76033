"""onnxruntime CPU latency of the exported embedded DINOv2 ViT-S/14 teacher vs its linear-elu student.

Both are exported once with dynamic height/width (``adala.models.export.export_onnx``, verified
against PyTorch at the first two resolutions), then run by onnxruntime's CPU provider at every
resolution, batch 1, fp32, teacher and student interleaved per round so load changes hit both;
the reported latency is the median of ``--repeats`` rounds after one warm-up. The student is the
untrained swap: latency does not depend on the weights. Prints a Markdown table and writes JSON.

  python benchmarks/onnx_latency.py --out docs/figures/onnx_latency.json [--resolutions 224,448,896]
      [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_once(sess, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    sess.run(None, {"pixel_values": x})
    return (time.perf_counter() - t0) * 1e3


def measure(sessions: dict, resolutions: list[int], repeats: int, log=print) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for res in resolutions:
        x = rng.standard_normal((1, 3, res, res), dtype=np.float32)
        times = {name: [] for name in sessions}
        for sess in sessions.values():
            time_once(sess, x)  # warm-up: allocations and kernel selection
        for _ in range(repeats):
            for name, sess in sessions.items():
                times[name].append(time_once(sess, x))
        row = {"resolution": res, "tokens": (res // 14) ** 2 + 1}
        for name, ts in times.items():
            row[f"{name}_ms"] = round(statistics.median(ts), 2)
            row[f"{name}_runs_ms"] = [round(t, 2) for t in ts]
        row["speedup"] = round(row["teacher_ms"] / row["student_ms"], 3)
        log(f"{res}px: teacher {row['teacher_ms']:.1f} ms, student {row['student_ms']:.1f} ms, "
            f"{row['speedup']:.2f}x")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| resolution | tokens | teacher ms | linear-elu student ms | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']}² | {r['tokens']} | {r['teacher_ms']:.1f} | {r['student_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--resolutions", default="224,448,896", help="comma-separated sizes (default 224,448,896)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per resolution (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    args = ap.parse_args(argv)
    resolutions = [int(v) for v in args.resolutions.split(",") if v.strip()]

    import onnxruntime as ort
    import torch

    import adala
    from adala.models.export import export_onnx

    torch.set_num_threads(args.threads)
    teacher = adala.load_teacher("dinov2-s14")
    student = adala.linearize(teacher, "linear-elu")
    checks = resolutions[:2]
    with tempfile.TemporaryDirectory() as tmp:
        sessions, errors = {}, {}
        for name, model in (("teacher", teacher), ("student", student)):
            report = export_onnx(model, Path(tmp) / f"{name}.onnx", opset=args.opset, dynamic=True,
                                 img_size=resolutions[0], check_sizes=checks)
            print(report.summary())
            errors[name] = report.errors
            sessions[name] = session(report.path, args.threads)
        rows = measure(sessions, resolutions, args.repeats)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/onnx_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "load_average_1min_after": round(os.getloadavg()[0], 2)},
        "onnxruntime": ort.__version__, "torch": torch.__version__, "opset": args.opset,
        "batch": 1, "repeats": args.repeats, "export_max_abs_error": errors, "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
