"""Teacher vs linear student as a user's own script sees them: fresh plain Python processes.

``adala bench`` and ``benchmarks/cpu_speedup.py`` run inside adala's commands, which may switch glibc to
keep freed memory (``adala.runtime.keep_freed_memory``). A user who writes ``s = adala.linearize(t)`` gets
no such setting, so here every model runs in its own fresh worker process that only imports adala, loads
the teacher, calls ``adala.linearize`` (students) and times ``forward_features`` under
``torch.inference_mode`` — nothing else. Per case (batch size x resolution) the workers start one after
the other, each does a tiny warm-up forward, resets its peak RSS and runs one full-size forward (its peak
RSS growth is the memory column: the same method as ``adala bench``'s memory subprocess), then the
parent asks them for timed forwards in interleaved rounds (order rotated; only one worker computes at
a time), so load from other processes hits every model alike. Medians are reported with the FLOP bound
(``adala.benchmark.flops``), minor page faults per forward and the user/system CPU time.

Arms: ``teacher`` and ``student`` in a plain process; for the cases in ``--kept`` also ``teacher-kept`` and
``student-kept`` (``adala.runtime.keep_freed_memory()`` called first), so one can see what the opt-in
still buys; ``--with-unstreamed`` adds ``student-unstreamed`` (blocks switched back to timm's own
``Block.forward``: the pre-streaming path). ``--chunk-sweep 256,512,...`` times the student at each rows-
per-chunk setting of ``adala.models.linear_block`` instead (how ``CHUNK_TOKENS`` was chosen).

A model is skipped at a size when its forward is predicted (from its previous size, scaled by FLOPs) to
take longer than ``--teacher-max-seconds`` / ``--student-max-seconds``; the JSON says so and why.

  python benchmarks/plain_process.py --out runs/plain            # batch 1 and 8, 224² .. 4088²
  python benchmarks/plain_process.py --out runs/sweep --batch-sizes 1 --resolutions 896,1344 \\
      --chunk-sweep 256,512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adala.benchmark.measure import busy_jiffies, process_jiffies

FORMAT = "adala-plain-process/1"
DEFAULT_KEPT = "1:224,448,896;8:448"


# ----------------------------------------------------------------------------------------------- worker
def worker(spec: dict[str, Any]) -> int:
    """One model in this (fresh) process: report peak RSS growth of its first full forward, then time
    one forward per ``run`` line read from stdin until ``quit``."""
    import resource

    import torch

    import adala
    import adala.runtime

    torch.set_num_threads(spec["threads"])
    if spec["kept"]:
        adala.runtime.keep_freed_memory()
    teacher = adala.load_teacher(spec["teacher"])
    if spec["role"] == "teacher":
        model = teacher
    else:
        model = adala.linearize(teacher, spec["attention"])
        del teacher
    model.eval()
    if not spec.get("streamed", True):
        from timm.models.vision_transformer import Block

        for block in model.blocks:
            block.__class__ = Block
    if spec.get("chunk"):
        from adala.models.linear_block import set_chunk_tokens

        set_chunk_tokens(spec["chunk"])
    from adala.benchmark.measure import proc_status_kb, reset_peak_rss

    p = model.patch_embed.patch_size[0]
    res, batch = spec["resolution"], spec["batch_size"]
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))

    def forward() -> dict[str, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with torch.inference_mode():
            model.forward_features(x)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        return {"s": t1 - t0, "minflt": r1.ru_minflt - r0.ru_minflt, "user_s": r1.ru_utime - r0.ru_utime,
                "sys_s": r1.ru_stime - r0.ru_stime}

    with torch.inference_mode():  # library start-up (thread pools, BLAS code pages) is not the model's memory
        model.forward_features(torch.zeros(1, 3, 2 * p, 2 * p))
    gc.collect()
    before = proc_status_kb("VmRSS")
    reset = before is not None and reset_peak_rss()
    first = forward()
    peak = proc_status_kb("VmHWM") if reset else None
    ready = {"ready": True, "first": first, "pid": os.getpid(),
             "peak_rss_growth_mib": None if peak is None else (peak - before) / 1024,
             "rss_after_mib": (proc_status_kb("VmRSS") or 0) / 1024}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(forward()), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- parent
class Zygote:
    """A process that has only imported torch, timm and adala, forking one worker per model and case.

    Importing torch and timm takes 10-25 s of CPU on this machine, more than most timed cases; a forked
    child starts from exactly the state a fresh ``python -c "import adala"`` has (no forward has run, no
    allocator setting, no OpenMP pool yet), so it is the same plain process, without paying the imports
    again. ``--no-fork`` starts a new interpreter per worker instead."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("zygote process failed to start")

    def fork(self, spec: dict[str, Any]) -> int:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def zygote() -> int:
    import signal

    import timm  # noqa: F401
    import torch  # noqa: F401

    import adala.models  # noqa: F401
    import adala.runtime  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                err = open(spec["stderr"], "w")  # noqa: SIM115 - the child exits below
                os.dup2(err.fileno(), 2)
                sys.stdin = open(spec["fifo_in"])  # noqa: SIM115
                sys.stdout = open(spec["fifo_out"], "w")  # noqa: SIM115
                code = worker(spec)
            except BaseException:  # noqa: BLE001 - report, then leave without running the zygote's loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    return 0


class Worker:
    def __init__(self, name: str, spec: dict[str, Any], zyg: Zygote | None, tmp: str) -> None:
        self.name, self.spec = name, spec
        self.err_path = os.path.join(tmp, f"{name}.err")
        if zyg is None:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=open(self.err_path, "w"), text=True)  # noqa: SIM115
            self.pid, self.inp, self.out = self.proc.pid, self.proc.stdin, self.proc.stdout
        else:
            self.proc = None
            fin, fout = os.path.join(tmp, f"{name}.in"), os.path.join(tmp, f"{name}.out")
            for f in (fin, fout):
                if os.path.exists(f):
                    os.unlink(f)
                os.mkfifo(f)
            self.pid = zyg.fork({**spec, "fifo_in": fin, "fifo_out": fout, "stderr": self.err_path})
            self.inp = open(fin, "w")  # noqa: SIM115 - closed in close()
            self.out = open(fout)  # noqa: SIM115
        self.ready = self._read()
        self.jiffies = 0

    def _read(self) -> dict[str, Any]:
        for line in self.out:
            if line.startswith("{"):
                return json.loads(line)
        time.sleep(0.5)
        with open(self.err_path) as f:
            tail = (f.read().strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{self.name} worker failed: {tail}")

    def run(self) -> dict[str, Any]:
        self.inp.write("run\n")
        self.inp.flush()
        return self._read()

    def close(self) -> None:
        self.jiffies = process_jiffies(self.pid) or 0
        try:
            self.inp.write("quit\n")
            self.inp.close()
        except OSError:
            pass
        self.out.close()
        if self.proc is not None:
            self.proc.wait()
        else:  # wait until the forked child is gone, so the next case starts on a quiet machine
            while os.path.exists(f"/proc/{self.pid}"):
                time.sleep(0.05)


def _parse_kept(text: str) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        batch, _, sizes = part.partition(":")
        out[int(batch)] = {int(s) for s in sizes.split(",") if s.strip()}
    return out


def _arms(args: argparse.Namespace, batch: int, res: int, kept: dict[int, set[int]]) -> list[tuple[str, dict]]:
    base = {"teacher": args.teacher, "attention": args.attention, "threads": args.threads, "resolution": res,
            "batch_size": batch, "kept": False}
    if args.chunk_sweep:
        arms = [(f"chunk-{c}", {**base, "role": "student", "chunk": c}) for c in args.chunk_sweep]
        return [("student-unstreamed", {**base, "role": "student", "streamed": False}), *arms]
    arms = [("teacher", {**base, "role": "teacher"}), ("student", {**base, "role": "student"})]
    if res in kept.get(batch, set()):
        arms += [("teacher-kept", {**base, "role": "teacher", "kept": True}),
                 ("student-kept", {**base, "role": "student", "kept": True})]
    if args.with_unstreamed:
        arms.append(("student-unstreamed", {**base, "role": "student", "streamed": False}))
    return arms


def _row(ready: dict[str, Any], runs: list[dict[str, float]], batch: int, flops: int) -> dict[str, Any]:
    times = [r["s"] for r in runs]
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
    return {
        "latency_ms": med * 1e3, "latency_ms_min": min(times) * 1e3, "latency_ms_iqr": (q[2] - q[0]) * 1e3,
        "latency_ms_all": [round(t * 1e3, 2) for t in times], "repeats": len(times), "images_per_s": batch / med,
        "gflops": flops / 1e9, "achieved_gflops_per_s": flops / 1e9 / med,
        "minor_faults_per_forward": statistics.median(r["minflt"] for r in runs),
        "user_s_per_forward": statistics.median(r["user_s"] for r in runs),
        "sys_s_per_forward": statistics.median(r["sys_s"] for r in runs),
        "peak_rss_growth_mib": ready["peak_rss_growth_mib"], "rss_after_mib": ready["rss_after_mib"],
        "first_forward_ms": ready["first"]["s"] * 1e3,
    }


def run_case(args: argparse.Namespace, batch: int, res: int, arms: list[tuple[str, dict]], flops: dict[str, int],
             predicted: dict[str, float | None], say, zyg: Zygote | None, tmp: str) -> dict[str, Any]:
    case: dict[str, Any] = {"batch_size": batch, "resolution": res, "arms": {}, "comparisons": []}
    live: list[tuple[str, dict]] = []
    for name, spec in arms:
        limit = args.teacher_max_seconds if spec["role"] == "teacher" else args.student_max_seconds
        if spec["role"] == "teacher" and args.teacher_max_resolution and res > args.teacher_max_resolution:
            case["arms"][name] = {"skipped": f"above --teacher-max-resolution {args.teacher_max_resolution}"}
        elif predicted.get(name) == math.inf:
            case["arms"][name] = {"skipped": "skipped at a smaller size already (its forward only grows)"}
        elif predicted.get(name) is not None and predicted[name] > limit:
            case["arms"][name] = {"skipped": f"predicted {predicted[name]:.0f} s per forward (previous size "
                                             f"scaled by FLOPs) > {limit:g} s limit"}
        else:
            live.append((name, spec))
    if not live:
        return case
    load0, busy0, self0 = os.getloadavg(), busy_jiffies(), process_jiffies() or 0
    t0 = time.monotonic()
    workers: list[Worker] = []
    try:
        for name, spec in live:
            say(f"b{batch} {res}px: starting {name}")
            workers.append(Worker(name, spec, zyg, tmp))
        first = min(w.ready["first"]["s"] for w in workers)
        slowest = max(w.ready["first"]["s"] for w in workers)
        rounds = args.long_repeats if slowest > args.long_seconds else max(
            args.repeats, math.ceil(args.min_seconds / max(first, 1e-6)))
        say(f"b{batch} {res}px: {len(workers)} models x {rounds} interleaved rounds")
        runs: list[list[dict]] = [[] for _ in workers]
        for r in range(rounds):
            for j in range(len(workers)):
                i = (j + r) % len(workers)
                runs[i].append(workers[i].run())
    finally:
        for w in workers:
            w.close()
    dt = time.monotonic() - t0
    busy1 = busy_jiffies()
    hz = os.sysconf("SC_CLK_TCK")
    if busy0 is not None and busy1 is not None:
        ours = ((process_jiffies() or 0) - self0) + sum(w.jiffies for w in workers)
        case["external_cores"] = max(0.0, (busy1 - busy0 - ours) / hz / dt)
    case["load_average"] = {"start": list(load0), "end": list(os.getloadavg())}
    for w, rs in zip(workers, runs):
        case["arms"][w.name] = _row(w.ready, rs, batch, flops[w.spec["role"]])
    case["tokens"] = flops["tokens"]
    _compare(case, flops)
    return case


def _compare(case: dict[str, Any], flops: dict[str, int]) -> None:
    arms = case["arms"]
    bound = flops["teacher"] / flops["student"]
    pairs = [("teacher", "student", "plain process"), ("teacher-kept", "student-kept", "keep_freed_memory()")]
    for t, s, label in pairs:
        if "latency_ms" in arms.get(t, {}) and "latency_ms" in arms.get(s, {}):
            speedup = arms[t]["latency_ms"] / arms[s]["latency_ms"]
            mt, ms = arms[t]["peak_rss_growth_mib"], arms[s]["peak_rss_growth_mib"]
            case["comparisons"].append({
                "teacher": t, "student": s, "allocator": label, "speedup": speedup, "flop_bound": bound,
                "fraction_of_bound": speedup / bound,
                "paired_median_speedup": statistics.median(
                    a / b for a, b in zip(arms[t]["latency_ms_all"], arms[s]["latency_ms_all"])),
                "peak_rss_growth_mib": {"teacher": mt, "student": ms},
                "student_memory_le_teacher": None if mt is None or ms is None else ms <= mt,
            })


def _fmt(v: float | None, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def table(record: dict[str, Any]) -> str:
    head = (f"{'batch':>5} {'res':>5} {'tokens':>6} {'teacher ms':>11} {'student ms':>11} {'speed-up':>8} "
            f"{'bound':>6} {'of bound':>8} {'peak MiB T/S':>13} {'faults T/S':>15} {'kept':>12} {'load':>5}")
    lines = [head, "-" * len(head)]
    for case in record["cases"]:
        arms = case["arms"]
        t, s = arms.get("teacher", {}), arms.get("student", {})
        if "latency_ms" not in s and "latency_ms" not in t:
            continue
        comp = {c["allocator"]: c for c in case["comparisons"]}
        plain, kept = comp.get("plain process"), comp.get("keep_freed_memory()")
        tms = _fmt(t.get("latency_ms"), ".1f", t.get("skipped") and "skipped" or "-")
        mem = f"{_fmt(t.get('peak_rss_growth_mib'), '.0f')}/{_fmt(s.get('peak_rss_growth_mib'), '.0f')}"
        flt = f"{_fmt(t.get('minor_faults_per_forward'), '.0f')}/{_fmt(s.get('minor_faults_per_forward'), '.0f')}"
        kept_s = "-" if kept is None else f"{kept['speedup']:.2f}x {100 * kept['fraction_of_bound']:.0f}%"
        bound = plain["flop_bound"] if plain else None
        lines.append(
            f"{case['batch_size']:>5} {case['resolution']:>5} {case.get('tokens', 0):>6} {tms:>11} "
            f"{_fmt(s.get('latency_ms'), '.1f'):>11} {_fmt(plain and plain['speedup'], '.2f') + 'x':>8} "
            f"{_fmt(bound, '.2f') + 'x':>6} {_fmt(plain and 100 * plain['fraction_of_bound'], '.0f') + '%':>8} "
            f"{mem:>13} {flt:>15} {kept_s:>12} {case['load_average']['start'][0]:>5.2f}")
    lines.append("peak = RSS growth over the first full forward in a fresh process; faults = minor page faults per "
                 "timed forward; kept = speed-up and fraction of bound with keep_freed_memory(); load = 1-min "
                 "load average at the start of the case")
    for case in record["cases"]:
        for name, arm in case["arms"].items():
            if "skipped" in arm:
                lines.append(f"b{case['batch_size']} {case['resolution']}px {name}: skipped ({arm['skipped']})")
    return "\n".join(lines)


def sweep_table(record: dict[str, Any]) -> str:
    lines = [f"{'batch':>5} {'res':>5} {'arm':<20} {'ms':>9} {'faults':>8} {'sys ms':>7} {'peak MiB':>9}"]
    for case in record["cases"]:
        for name, a in case["arms"].items():
            if "latency_ms" in a:
                lines.append(f"{case['batch_size']:>5} {case['resolution']:>5} {name:<20} {a['latency_ms']:>9.1f} "
                             f"{a['minor_faults_per_forward']:>8.0f} {1e3 * a['sys_s_per_forward']:>7.1f} "
                             f"{_fmt(a['peak_rss_growth_mib'], '.0f'):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(json.loads(argv[1]))
    if argv[:1] == ["--zygote"]:
        return zygote()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (plain_process.json)")
    ap.add_argument("--teacher", default="dinov2-s14")
    ap.add_argument("--attention", default="linear-elu")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--resolutions", default="224,448,672,896,1344,2044,4088",
                    help="multiples of the patch size (14): 2044² and 4088² are the 2048²/4096² class")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds at least")
    ap.add_argument("--min-seconds", type=float, default=10.0,
                    help="more rounds until the quickest model is timed about this long (224² needs dozens)")
    ap.add_argument("--long-seconds", type=float, default=30.0, help="forwards longer than this get --long-repeats")
    ap.add_argument("--long-repeats", type=int, default=2)
    ap.add_argument("--teacher-max-seconds", type=float, default=60.0,
                    help="skip the teacher where its forward is predicted to take longer")
    ap.add_argument("--student-max-seconds", type=float, default=150.0)
    ap.add_argument("--teacher-max-resolution", type=int, default=None, help="skip the teacher above this size")
    ap.add_argument("--kept", default=DEFAULT_KEPT,
                    help="batch:sizes;... where keep_freed_memory() arms run too ('' for none)")
    ap.add_argument("--with-unstreamed", action="store_true", help="also time the pre-streaming block path")
    ap.add_argument("--no-fork", action="store_true",
                    help="a new interpreter per worker instead of forking from a freshly imported one")
    ap.add_argument("--chunk-sweep", default=None, help="comma-separated rows per chunk: sweep the student only")
    args = ap.parse_args(argv)
    args.chunk_sweep = [int(c) for c in args.chunk_sweep.split(",")] if args.chunk_sweep else None
    batches = [int(b) for b in args.batch_sizes.split(",")]
    sizes = [int(r) for r in args.resolutions.split(",")]
    kept = _parse_kept(args.kept)

    import adala  # the parent only counts FLOPs; every timed forward runs in a worker

    teacher = adala.load_teacher(args.teacher)
    student = adala.linearize(teacher, args.attention)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/plain_process.py", *argv]),
        "environment": {"adala": adala.__version__, "torch": __import__("torch").__version__,
                        "python": platform.python_version(), "platform": platform.platform(),
                        "glibc": "-".join(platform.libc_ver()), "cpu_count": os.cpu_count(),
                        "nice": os.nice(0), "load_average_start": list(os.getloadavg())},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "cases": [],
    }

    def say(msg: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    path = out / "plain_process.json"
    zyg = None if args.no_fork else Zygote()
    tmp = tempfile.mkdtemp(prefix="adala-plain-")
    try:
        _run_all(args, batches, sizes, kept, teacher, student, record, path, say, zyg, tmp)
    finally:
        if zyg is not None:
            zyg.close()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    print(sweep_table(record) if args.chunk_sweep else table(record))
    print(f"wrote {path}")
    return 0


def _run_all(args, batches, sizes, kept, teacher, student, record, path, say, zyg, tmp) -> None:
    from adala.benchmark.flops import model_flops

    for batch in batches:
        last: dict[str, tuple[int, float]] = {}  # arm -> (flops, seconds) at the previous size
        for res in sizes:
            flops = {"teacher": model_flops(teacher, res, batch)["total"],
                     "student": model_flops(student, res, batch)["total"],
                     "tokens": model_flops(student, res, 1)["tokens"]}
            arms = _arms(args, batch, res, kept)
            predicted = {n: last[n][1] * flops[s["role"]] / last[n][0] if n in last else None for n, s in arms}
            case = run_case(args, batch, res, arms, flops, predicted, say, zyg, tmp)
            for name, spec in arms:
                arm = case["arms"].get(name, {})
                if "latency_ms" in arm:
                    last[name] = (flops[spec["role"]], arm["latency_ms"] / 1e3)
                elif "skipped" in arm and name in last:  # the prediction grows with the size: skip onwards
                    last[name] = (1, math.inf)
            record["cases"].append(case)
            for c in case["comparisons"]:
                say(f"b{batch} {res}px [{c['allocator']}]: {c['speedup']:.2f}x, bound {c['flop_bound']:.2f}x "
                    f"({100 * c['fraction_of_bound']:.0f}%), peak MiB {c['peak_rss_growth_mib']}")
            record["environment"]["load_average_end"] = list(os.getloadavg())
            path.write_text(json.dumps(record, indent=1) + "\n")  # partial results survive an interrupted run


if __name__ == "__main__":
    sys.exit(main())
