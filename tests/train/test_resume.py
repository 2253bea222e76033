"""Exact resume after SIGKILL, in real processes: 1 CPU process and ``torchrun --nproc_per_node 2`` (gloo).

A run killed at a random moment (or while writing a checkpoint) and restarted with resume must end with the
same weights and optimizer state, bit for bit, as an uninterrupted run of the same length.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adala.train import read_log
from adala.train.checkpoint import complete_checkpoints, verify

WORKER = Path(__file__).with_name("ddp_worker.py")
ARGS = ["--steps", "40", "--ckpt-every", "4"]
DDP_ARGS = ["--steps", "24", "--ckpt-every", "4"]
STARTUP_TIMEOUT = 120  # importing torch on a busy 2-core machine can take a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out: Path, args: list[str], procs: int = 1) -> list[str]:
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(procs),
                     "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [*launcher, str(WORKER), "--out", str(out), *args]


def start(out: Path, args: list[str], procs: int = 1) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(out.parent / f"{out.name}.output", "ab") as log:
        return subprocess.Popen(command(out, args, procs), stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, (out.parent / f"{out.name}.output").read_text()[-3000:]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, delay: float) -> None:
    """SIGKILL the launcher and every process under it ``delay`` seconds after the first checkpoint appeared."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not complete_checkpoints(out / "checkpoints"):
        assert proc.poll() is None, (out.parent / f"{out.name}.output").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(delay)
    assert kill_tree(proc) == -signal.SIGKILL, "the run finished before it could be killed"


def kill_tree(proc: subprocess.Popen) -> int | None:
    """SIGKILL a launcher we started and every process under it; wait until all are gone."""
    victims = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not all(gone(pid) for pid in victims):
        assert time.monotonic() < deadline, "a killed worker is still running"
        time.sleep(0.05)
    return rc


def assert_same_run(a: Path, b: Path, ranks: int = 1) -> None:
    for r in range(ranks):
        wa, wb = load_file(str(a / f"final-rank{r}.safetensors")), load_file(str(b / f"final-rank{r}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"rank {r} {k}: max abs diff {(wa[k] - wb[k]).abs().max()}"
    (_, last_a), (_, last_b) = complete_checkpoints(a / "checkpoints")[-1], complete_checkpoints(b / "checkpoints")[-1]
    assert last_a.name == last_b.name
    oa, ob = load_file(str(last_a / "optimizer.safetensors")), load_file(str(last_b / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run, started at once and shared; call it to wait for the result."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = start(out, ARGS)

    def done() -> Path:
        finish(proc, out)
        return out

    yield done
    if proc.poll() is None:
        kill_tree(proc)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_exact(tmp_path, reference):
    delay = random.Random().uniform(0.0, 1.5)
    victim = tmp_path / "victim"
    kill_after_first_checkpoint(start(victim, [*ARGS, "--sleep", "0.06"]), victim, delay)
    assert complete_checkpoints(victim / "checkpoints")[-1][0] < 40, f"killed after {delay:.2f}s: too late"
    for _, path in complete_checkpoints(victim / "checkpoints"):
        assert verify(path) is None, f"a checkpoint under its real name is incomplete (kill after {delay:.2f}s)"
    finish(start(victim, [*ARGS, "--resume"]), victim)
    assert_same_run(reference(), victim)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(tmp_path, reference):
    victim = tmp_path / "victim"
    proc = start(victim, [*ARGS, "--kill-in-checkpoint", "8"])
    assert proc.wait(timeout=180) == -signal.SIGKILL
    root = victim / "checkpoints"
    assert (root / "step-0000008.tmp" / "student.safetensors").is_file()  # died half-way through step 8
    assert [p.name for _, p in complete_checkpoints(root)] == ["step-0000004"]
    assert (root / "latest").read_text().strip() == "step-0000004"
    finish(start(victim, [*ARGS, "--resume"]), victim)
    assert not (root / "step-0000008.tmp").exists()
    assert_same_run(reference(), victim)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stay_in_sync_and_resume_exactly(tmp_path):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    ref_proc, resumed = start(reference, DDP_ARGS, procs=2), None
    try:
        kill_after_first_checkpoint(start(victim, [*DDP_ARGS, "--sleep", "0.1"], procs=2), victim,
                                    random.Random().uniform(0.0, 1.0))
        assert complete_checkpoints(victim / "checkpoints")[-1][0] < 24
        resumed = start(victim, [*DDP_ARGS, "--resume"], procs=2)  # runs alongside the reference
        finish(ref_proc, reference)
        finish(resumed, victim)
    finally:
        for p in (ref_proc, resumed):
            if p is not None and p.poll() is None:
                kill_tree(p)
    w0 = load_file(str(reference / "final-rank0.safetensors"))
    w1 = load_file(str(reference / "final-rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP kept the ranks identical
    saved = load_file(str(reference / "checkpoints" / "step-0000024" / "student.safetensors"))
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    rng = load_file(str(reference / "checkpoints" / "step-0000024" / "rng.safetensors"))
    assert not torch.equal(rng["rank0/torch"], rng["rank1/torch"])  # each rank's own stream is saved
    h0, h1 = (json.loads((reference / f"history-rank{r}.json").read_text()) for r in range(2))
    assert h0 == h1 and [h[0] for h in h0] == [5, 10, 15, 20, 24]  # loss/metrics are averaged over ranks
    logged = [[r["step"], r["loss"], r["mae"]] for r in read_log(reference) if "event" not in r]
    assert logged == h0 and sum(r.get("event") == "start" for r in read_log(reference)) == 1  # rank 0 logs
    assert_same_run(reference, victim, ranks=2)
    resumed_history = json.loads((victim / "history-rank0.json").read_text())
    assert [h[:2] for h in resumed_history] == [h[:2] for h in h0]  # the same logged losses after resume
    assert [h[2] for h in resumed_history] == pytest.approx([h[2] for h in h0], rel=1e-6)
